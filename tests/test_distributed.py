"""Data parallel on CPU (gloo, 2 processes): the probe agrees across ranks and equals a
single-process probe, a rank without a probe batch does not hang, a rank that fails makes
every rank fail, and ``torchrun -m aletheia_lora train`` writes one adapter."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_model, word_tokenizer

TESTS = Path(__file__).resolve().parent
TIMEOUT = 180  # seconds; a hang fails the test instead of stalling the suite

# One launch, three scenarios, run by each of 2 ranks after a single-process reference.
SCRIPT = """
import json, os, sys
sys.path.insert(0, {tests!r})
import torch
import torch.distributed as dist
from conftest import tiny_model, token_rows
from aletheia_lora.probe import gradient_probe
from aletheia_lora.selection import select_layers

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **extra,
    }


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("dist")
    script = root / "probe_script.py"
    script.write_text(SCRIPT.format(tests=str(TESTS), out=str(root)))
    common = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script)],
            env=_env(RANK=str(r), LOCAL_RANK=str(r), **common),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    outputs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=TIMEOUT)
            outputs.append({"rc": p.returncode, "stdout": out, "stderr": err})
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    results = [
        json.loads((root / f"rank{r}.json").read_text()) if (root / f"rank{r}.json").is_file() else None
        for r in range(2)
    ]
    return {"procs": outputs, "results": results}


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
           "--master_port", str(_free_port()), "-m", "aletheia_lora", "train",
           "--model", str(tmp_path / "model"), "--data", str(data), "--output_dir", str(out),
           "--max_steps", "2", "--per_device_train_batch_size", "2", "--max_length", "32",
           "--probe_batches", "3", "--eval_generate", "1", "--max_eval_samples", "4",
           "--save_steps", "100", "--logging_steps", "1", "--use_cpu", "true", "--quiet", "true"]  # fmt: skip
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
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
