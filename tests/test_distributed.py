"""Data parallel on CPU (gloo, 2 processes): the probe agrees across ranks and equals a
single-process probe, a rank without a probe batch does not hang, a rank that fails makes
every rank fail, ``torchrun -m aletheia_lora train`` writes one adapter, a user script
(``prepare_model`` + ``Trainer``) runs under ``accelerate launch``, and the one-pass probe works
on FSDP2- and FSDP1-sharded LoRA models. Every rank script runs through ``tests/ranks.py``, which
ends each rank cleanly (see there)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_model, word_tokenizer
from ranks import TESTS, TIMEOUT, both_ranks_succeed, clean_exit_argv, free_port, rank_env, run_two_ranks

# One launch, three scenarios, run by each of 2 ranks after a single-process reference.
SCRIPT = """
import json, os, sys
sys.path.insert(0, {tests!r})
import torch
import torch.distributed as dist
from conftest import tiny_model, token_rows
from aletheia_lora import gradient_probe, select_layers

torch.set_num_threads(1)
rank = int(os.environ["RANK"])
model, rows = tiny_model("llama"), token_rows(8)
kw = dict(batch_size=2, max_length=16)
result = {{"reference": {{}}, "distributed": {{}}}}
for n in (4, 1):  # before init_process_group: a plain single-process probe
    result["reference"][n] = dict(gradient_probe(model, rows, probe_batches=n, **kw))

dist.init_process_group("gloo")
for n in (4, 1):  # 4 batches: 2 per rank; 1 batch: rank 1 has none
    scores = gradient_probe(model, rows, probe_batches=n, **kw)
    result["distributed"][n] = {{"scores": dict(scores), "meta": scores.meta,
                                 "selected": select_layers(scores, 50)}}
with open(os.path.join({out!r}, f"rank{{rank}}.json"), "w") as f:
    json.dump(result, f)

if rank == 1:  # rank 1 fails during its share of the probe
    def fail(module, args):
        raise ValueError("injected failure on rank 1")
    model.get_submodule("model.layers.2").register_forward_pre_hook(fail)
gradient_probe(model, rows, probe_batches=4, **kw)
print("the failing probe returned", flush=True)
"""


def _qa_jsonl(path: Path, n: int) -> Path:
    """``n`` question/answer rows in the word tokenizer's vocabulary."""
    words = "the a cat dog sat on mat and ran to is was big small red blue".split()
    rows = [
        {"question": f"{words[i % len(words)]} {words[(3 * i) % len(words)]} {i % 5} and {i % 4}",
         "answer": f"the {i % 5 + i % 4}\n#### {i % 5 + i % 4}"}
        for i in range(n)
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict:
    return run_two_ranks(SCRIPT, tmp_path_factory.mktemp("dist"))


# A rank that would abort at interpreter exit, after its work: atexit's os.abort stands in for
# the C++ static destructors that end gloo and DeepSpeed ranks with "terminate called without an
# active exception" (rc -6). The launcher's clean ending never reaches interpreter exit.
ABORT_AT_EXIT_SCRIPT = """
import atexit, json, os
import torch.distributed as dist
dist.init_process_group("gloo")
atexit.register(os.abort)
with open(os.path.join({out!r}, f"rank{{dist.get_rank()}}.json"), "w") as f:
    json.dump({{"rank": dist.get_rank(), "world_size": dist.get_world_size()}}, f)
"""


def test_the_launcher_ends_a_rank_cleanly_after_its_work_is_written(tmp_path):
    assert both_ranks_succeed(ABORT_AT_EXIT_SCRIPT, tmp_path) == [
        {"rank": r, "world_size": 2} for r in range(2)
    ]


def _rel_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert math.isclose(a[k], b[k], rel_tol=1e-6), (k, a[k], b[k])


@pytest.mark.parametrize("n", ["4", "1"])
def test_ranks_agree_and_match_a_single_process_probe(two_ranks, n):
    r0, r1 = two_ranks["results"]
    assert r0 is not None and r1 is not None, [p["stderr"][-2000:] for p in two_ranks["procs"]]
    d0, d1 = r0["distributed"][n], r1["distributed"][n]
    assert d0["scores"] == d1["scores"]  # identical, not merely close
    assert d0["selected"] == d1["selected"] and len(d0["selected"]) == 2
    assert d0["meta"]["world_size"] == d1["meta"]["world_size"] == 2
    assert d0["meta"]["batches"] == int(n)
    _rel_close(d0["scores"], r0["reference"][n])
    assert all(v > 0 for v in d0["scores"].values())


def test_a_failing_rank_makes_every_rank_raise(two_ranks):
    for rank, proc in enumerate(two_ranks["procs"]):
        assert proc["rc"] != 0, (rank, proc["stderr"][-2000:])
        assert "the failing probe returned" not in proc["stdout"]
        assert "injected failure on rank 1" in proc["stderr"], (rank, proc["stderr"][-2000:])
    assert "rank 1: ValueError: injected failure on rank 1" in two_ranks["procs"][0]["stderr"]


def test_torchrun_train_writes_one_adapter(tmp_path):
    tiny_model("llama", num_layers=4).save_pretrained(tmp_path / "model")
    word_tokenizer().save_pretrained(tmp_path / "model")
    data = _qa_jsonl(tmp_path / "data.jsonl", 24)
    out = tmp_path / "run"
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "aletheia_lora", "train",
           "--model", str(tmp_path / "model"), "--data", str(data), "--output_dir", str(out),
           "--max_steps", "2", "--per_device_train_batch_size", "2", "--max_length", "32",
           "--probe_batches", "3", "--eval_generate", "1", "--max_eval_samples", "4",
           "--save_steps", "100", "--logging_steps", "1", "--use_cpu", "true", "--quiet", "true"]  # fmt: skip
    proc = subprocess.run(cmd, env=rank_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (out / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in out.glob("adapter_model*")) == ["adapter_model.safetensors"]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp leftovers
    record = json.loads((out / "aletheia.json").read_text())
    assert record["plan"]["scores"]["meta"]["world_size"] == 2
    assert record["train_steps"] == 2
    losses = [h["loss"] for h in record["log_history"] if "loss" in h]
    assert losses and all(math.isfinite(x) for x in losses)
    assert math.isfinite(record["final_train_loss"])


KILLED_SCRIPT = """
import os, signal, sys, time
sys.path.insert(0, {tests!r})
import torch
import torch.distributed as dist
from conftest import tiny_model, token_rows
from aletheia_lora import gradient_probe

torch.set_num_threads(1)
dist.init_process_group("gloo")
model = tiny_model("llama")
if dist.get_rank() == 1:  # rank 1 dies without a word in the middle of its share of the probe
    model.get_submodule("model.layers.2").register_forward_pre_hook(
        lambda module, args: os.kill(os.getpid(), signal.SIGKILL))
gradient_probe(model, token_rows(8), probe_batches=4, batch_size=2, max_length=16)
print("rank", dist.get_rank(), "finished the probe", flush=True)
"""


def test_a_rank_killed_by_a_signal_ends_the_job_instead_of_hanging(tmp_path):
    # An exception can be shared with the other ranks; SIGKILL cannot. The launcher (torchrun,
    # as under accelerate launch) sees the dead worker and stops the rank waiting in the all-reduce.
    script = tmp_path / "killed.py"
    script.write_text(KILLED_SCRIPT.format(tests=str(TESTS)))
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), *clean_exit_argv(script)]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=rank_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode != 0
    assert time.perf_counter() - start < 120
    assert "finished the probe" not in proc.stdout
    assert "SIGKILL" in proc.stderr or "Signal 9" in proc.stderr, proc.stderr[-3000:]


# A user's own training script: prepare_model + transformers.Trainer, under accelerate launch.
USER_SCRIPT = """
import hashlib, json, os, sys
sys.path.insert(0, {tests!r})
import torch
import torch.distributed as dist
import transformers as T
from conftest import tiny_model, token_rows
from aletheia_lora import prepare_model
from aletheia_lora.data import DataCollator
from aletheia_lora.truncation import TruncatedBackwardCallback

torch.set_num_threads(1)
args = T.TrainingArguments(
    output_dir=os.path.join({out!r}, "trainer"), use_cpu=True, max_steps=3, seed=0,
    per_device_train_batch_size=2, learning_rate=1e-2, logging_steps=1, save_strategy="no",
    report_to="none", disable_tqdm=True, ddp_find_unused_parameters=False,
)
args.device  # sets up the process group now, so the probe below runs data-parallel
assert dist.is_initialized() and dist.get_world_size() == 2
rows = token_rows(16)
model, plan = prepare_model(tiny_model("llama"), rows, top_k=2, r=4, probe_batches=4)
assert plan.scores.meta["world_size"] == 2, plan.scores.meta
trainer = T.Trainer(model=model, args=args, train_dataset=rows, data_collator=DataCollator(0),
                    callbacks=[TruncatedBackwardCallback()])
result = trainer.train()
digest, lora_b_abs = hashlib.sha256(), 0.0
for name, p in sorted(model.named_parameters()):
    if "lora_" in name:
        digest.update(name.encode())
        digest.update(p.detach().double().numpy().tobytes())
        lora_b_abs += float(p.abs().sum()) if "lora_B" in name else 0.0
with open(os.path.join({out!r}, f"rank{{dist.get_rank()}}.json"), "w") as f:
    json.dump({{"selected": plan.selected_layers, "lora_sha256": digest.hexdigest(),
               "lora_b_abs": lora_b_abs, "train_loss": result.training_loss,
               "wrapped": type(trainer.model_wrapped).__name__,
               "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]}}, f)
"""


def test_accelerate_launch_user_script_with_prepare_model_and_trainer(tmp_path):
    script = tmp_path / "user_script.py"
    script.write_text(USER_SCRIPT.format(tests=str(TESTS), out=str(tmp_path)))
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), *clean_exit_argv(script)]  # fmt: skip
    proc = subprocess.run(
        cmd, env=rank_env(ACCELERATE_USE_CPU="true"), capture_output=True, text=True, timeout=TIMEOUT
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["selected"] == r1["selected"] and len(r0["selected"]) == 2
    assert r0["lora_sha256"] == r1["lora_sha256"]  # DDP kept the LoRA weights bit-identical
    assert r0["lora_b_abs"] > 0  # B starts at zero: training moved it
    assert r0["wrapped"] == r1["wrapped"] == "DistributedDataParallel"
    for r in (r0, r1):
        assert len(r["losses"]) == 3 and all(math.isfinite(x) for x in r["losses"])
        assert math.isfinite(r["train_loss"])


# FSDP2 (torch.distributed.fsdp.fully_shard) over gloo on CPU: LoRA first, then shard, then probe.
FSDP_SCRIPT = """
import json, os, sys
sys.path.insert(0, {tests!r})
import torch
import torch.distributed as dist
from conftest import tiny_model, token_rows
from peft import get_peft_model
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from aletheia_lora import apply_aletheia_lora, gradient_probe

torch.set_num_threads(1)
model, rows = tiny_model("llama"), token_rows(8)
kw = dict(probe_batches=4, batch_size=2, max_length=16)
methods = ("onepass", "chunked")
reference = {{m: dict(gradient_probe(model, rows, method=m, **kw)) for m in methods}}  # one process
dist.init_process_group("gloo")
rank = dist.get_rank()
peft = get_peft_model(model, apply_aletheia_lora(model, [1, 2], r=4))
for layer in peft.base_model.model.model.layers:
    fully_shard(layer)
fully_shard(peft)
result = {{"reference": reference, "sharded": all(isinstance(p, DTensor) for p in peft.parameters())}}
for m in methods:
    try:
        scores = gradient_probe(peft, rows, method=m, **kw)
        result[m] = {{"scores": dict(scores), "world_size": scores.meta["world_size"]}}
    except ValueError as err:
        result[m] = {{"error": str(err)}}
opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-2)
g, losses = torch.Generator().manual_seed(rank), []  # each rank its own data
for _ in range(3):
    ids = torch.randint(3, 100, (2, 12), generator=g)
    loss = peft(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    losses.append(loss.item())
result["losses"] = losses
result["still_sharded"] = all(isinstance(p, DTensor) for p in peft.parameters())
result["lora_b"] = {{n: p.full_tensor().abs().sum().item() for n, p in peft.named_parameters() if "lora_B" in n}}
with open(os.path.join({out!r}, f"rank{{rank}}.json"), "w") as f:
    json.dump(result, f)
"""


@pytest.fixture(scope="module")
def fsdp_ranks(tmp_path_factory) -> list[dict]:
    return both_ranks_succeed(FSDP_SCRIPT, tmp_path_factory.mktemp("fsdp"))


def test_fsdp2_onepass_probe_on_a_sharded_lora_model_matches_the_unsharded_probe(fsdp_ranks):
    r0, r1 = fsdp_ranks
    assert r0["sharded"] and r1["sharded"]  # every parameter is a DTensor shard
    assert r0["onepass"]["scores"] == r1["onepass"]["scores"]
    assert r0["onepass"]["world_size"] == 2
    _rel_close(r0["onepass"]["scores"], r0["reference"]["onepass"])


def test_fsdp2_training_after_the_probe_keeps_lora_in_sync(fsdp_ranks):
    r0, r1 = fsdp_ranks
    assert r0["still_sharded"] and r1["still_sharded"]  # the probe left the FSDP state alone
    assert r0["lora_b"] == r1["lora_b"] and all(v > 0 for v in r0["lora_b"].values())
    assert all(math.isfinite(x) for x in r0["losses"] + r1["losses"])


def test_fsdp2_chunked_probe_is_refused_on_a_sharded_model(fsdp_ranks):
    # chunked reads param.grad, which FSDP2's backward has already reduced across ranks:
    # its scores would be wrong without an error, so the probe refuses and names the fix
    for r in fsdp_ranks:
        assert "method='onepass'" in r["chunked"]["error"]


# FSDP1 (FullyShardedDataParallel, use_orig_params=True) over gloo on CPU: LoRA first, then
# auto-wrap one FSDP unit per LlamaDecoderLayer, then probe through the root unit, then train.
# The probe runs on the FSDP root, not on ``fsdp.module``: the root unit owns the embeddings,
# final norm and lm_head, and only its forward all-gathers them; calling the inner PeftModel
# skips that and meets 1-D shards (``RuntimeError: 'weight' must be 2-D`` in the embedding).
FSDP1_SCRIPT = """
import functools, hashlib, json, os, sys
sys.path.insert(0, {tests!r})
import torch
import torch.distributed as dist
from conftest import tiny_model, token_rows
from peft import get_peft_model
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
from transformers.models.llama.modeling_llama import LlamaDecoderLayer
from aletheia_lora import apply_aletheia_lora, gradient_probe

torch.set_num_threads(1)
model, rows = tiny_model("llama"), token_rows(8)
kw = dict(probe_batches=4, batch_size=2, max_length=16)
ref = gradient_probe(model, rows, **kw)  # one process, the base model without LoRA
result = {{"reference": {{"scores": dict(ref), "roles": ref.roles, "modules": ref.modules}}}}
dist.init_process_group("gloo")
rank = dist.get_rank()
peft = get_peft_model(model, apply_aletheia_lora(model, [1, 2], r=4, lora_alpha=8))
policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={{LlamaDecoderLayer}})
fsdp = FSDP(peft, auto_wrap_policy=policy, use_orig_params=True, device_id=torch.device("cpu"))
trainable = sorted(n for n, p in fsdp.named_parameters() if p.requires_grad)
result["units"] = {{
    name: {{"wraps": type(unit.module).__name__, "fqns": list(unit._flat_param._fqns),
           "requires_grad": unit._flat_param.requires_grad}}
    for name, unit in fsdp.named_modules() if isinstance(unit, FSDP)
}}
scores = gradient_probe(fsdp, rows, **kw)
result["probe"] = {{"scores": dict(scores), "roles": scores.roles, "modules": scores.modules,
                   "meta": scores.meta}}
result["trainable_kept"] = trainable == sorted(n for n, p in fsdp.named_parameters() if p.requires_grad)
opt = torch.optim.AdamW([p for p in fsdp.parameters() if p.requires_grad], lr=1e-2)
g, losses = torch.Generator().manual_seed(rank), []  # each rank its own data
for _ in range(3):
    ids = torch.randint(3, 100, (2, 12), generator=g)
    loss = fsdp(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    losses.append(loss.item())
result["losses"] = losses
digest, lora_b = hashlib.sha256(), {{}}
with FSDP.summon_full_params(fsdp, writeback=False):  # full (unsharded) LoRA weights on each rank
    for name, p in sorted(fsdp.named_parameters()):
        if "lora_" in name:
            digest.update(name.encode())
            digest.update(p.detach().double().numpy().tobytes())
            if "lora_B" in name:
                lora_b[name] = p.abs().sum().item()
result.update(lora_sha256=digest.hexdigest(), lora_b=lora_b)
try:  # the inner module, past the root unit: its parameters are still flat 1-D shards
    gradient_probe(fsdp.module, rows, **kw)
    result["inner_module_probe"] = "ran"
except RuntimeError as err:
    result["inner_module_probe"] = str(err)
with open(os.path.join({out!r}, f"rank{{rank}}.json"), "w") as f:
    json.dump(result, f)
"""


@pytest.fixture(scope="module")
def fsdp1_ranks(tmp_path_factory) -> list[dict]:
    return both_ranks_succeed(FSDP1_SCRIPT, tmp_path_factory.mktemp("fsdp1"))


def test_fsdp1_auto_wrap_puts_each_decoder_layer_in_its_own_unit(fsdp1_ranks):
    layers = "_fsdp_wrapped_module.base_model.model.model.layers"
    for r in fsdp1_ranks:
        units = r["units"]
        assert sorted(units) == ["", *(f"{layers}.{i}" for i in range(4))]
        assert units[""]["wraps"] == "PeftModelForCausalLM"  # the root keeps embeddings, norm, lm_head
        assert units[""]["fqns"] == [
            "base_model.model.model.embed_tokens.weight",
            "base_model.model.model.norm.weight",
            "base_model.model.lm_head.weight",
        ]
        for i in range(4):
            unit = units[f"{layers}.{i}"]
            assert unit["wraps"] == "LlamaDecoderLayer"
            lora = [f for f in unit["fqns"] if ".lora_" in f]
            if i in (1, 2):  # adapted: frozen base weights and trainable LoRA share one flat parameter
                assert len(lora) == 14 and "self_attn.q_proj.base_layer.weight" in unit["fqns"]
                assert unit["requires_grad"]
            else:
                assert not lora and "self_attn.q_proj.weight" in unit["fqns"]
                assert not unit["requires_grad"]


def test_fsdp1_onepass_probe_through_the_root_unit_matches_the_single_process_probe(fsdp1_ranks):
    r0, r1 = fsdp1_ranks
    p0, p1 = r0["probe"], r1["probe"]
    assert p0["scores"] == p1["scores"]  # identical, not merely close
    assert p0["meta"]["world_size"] == 2 and p0["meta"]["batches"] == 4
    # LoRA B starts at zero, so every base Linear sees the same input and output gradient as
    # without LoRA: the lora-targets scores (base weight gradient norms) equal the reference's
    ref = r0["reference"]
    _rel_close(p0["scores"], ref["scores"])
    for layer in ref["scores"]:
        _rel_close(p0["roles"][layer], ref["roles"][layer])
        # the per-tensor names are read through the FSDP unit and keep its wrapper prefix
        prefix = "_fsdp_wrapped_module."
        assert all(name.startswith(prefix) for name in p0["modules"][layer])
        named = {name.removeprefix(prefix): v for name, v in p0["modules"][layer].items()}
        _rel_close(named, ref["modules"][layer])
    assert p0["meta"]["blocks_path"] == "_fsdp_wrapped_module.base_model.model.model.layers"


def test_fsdp1_training_after_the_probe_keeps_lora_in_sync(fsdp1_ranks):
    r0, r1 = fsdp1_ranks
    assert r0["trainable_kept"] and r1["trainable_kept"]  # the probe restored requires_grad
    assert r0["lora_sha256"] == r1["lora_sha256"]
    assert r0["lora_b"] == r1["lora_b"] and len(r0["lora_b"]) == 14
    assert all(v > 0 for v in r0["lora_b"].values())  # B starts at zero: training moved it
    assert r0["losses"] != r1["losses"]  # each rank trained on its own data
    assert all(math.isfinite(x) for x in r0["losses"] + r1["losses"])


def test_fsdp1_probe_on_the_inner_module_meets_the_sharded_root_parameters(fsdp1_ranks):
    for r in fsdp1_ranks:
        assert "must be 2-D" in r["inner_module_probe"], r["inner_module_probe"]
