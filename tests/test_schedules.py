"""Schedules over the run: progressive freezing and probe-weighted backward dropping, on tiny Llamas.

What must hold: a frozen prefix gets no gradient and no backward runs below the lowest block still
training; decisions are a function of the seed; a Trainer run resumed from a mid-schedule checkpoint
equals the uninterrupted run; two DDP ranks freeze the same blocks at the same step; dropping with
probability 0 is all-layer LoRA bit for bit, with probability 1 a block's adapters get no gradient
while the blocks below still do; the drop rates meet their cost target.
"""

from __future__ import annotations

import copy
import json
import math
import shutil

import pytest
import torch
from conftest import saved_workspace, tiny_model, token_rows
from peft import get_peft_model
from ranks import both_ranks_succeed
from test_cli import FAST, _base
from test_truncation import _count_backward
from transformers import Trainer, TrainingArguments

from aletheia_lora import apply_aletheia_lora
from aletheia_lora.batches import collate
from aletheia_lora.cli import main
from aletheia_lora.costmodel import uniform_cost_model
from aletheia_lora.data import DataCollator
from aletheia_lora.schedules import (
    DropSchedule,
    FreezeSchedule,
    ScheduleCallback,
    checkpoint_schedule_state,
    drop_rates,
    scheduled_step_cost,
)
from aletheia_lora.scores import LayerScores
from aletheia_lora.timing import optimizer_step
from aletheia_lora.truncation import TruncatedBackwardCallback, truncate_backward

LAYERS = 6


def _all_layer_lora(seed: int = 0, model_seed: int = 0):
    base = tiny_model("llama", num_layers=LAYERS, seed=model_seed)
    torch.manual_seed(seed)
    model = get_peft_model(base, apply_aletheia_lora(base, list(range(LAYERS)), r=4))
    truncate_backward(model)
    return model.train()


def _lora(model, block: int) -> dict[str, torch.Tensor]:
    prefix = f"layers.{block}."
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n and prefix in n}


def _train(model, schedule=None, steps: int = 6, lr: float = 1e-2, seed: int = 0) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    if schedule is not None:
        schedule.attach(model)
    rows = token_rows(2 * steps, seed=seed)
    losses = []
    for step in range(steps):
        if isinstance(schedule, DropSchedule):
            schedule.step_begin(step)
        loss, _ = optimizer_step(model, optimizer, collate(rows[2 * step : 2 * step + 2]))
        if isinstance(schedule, FreezeSchedule):
            schedule.step_end(step + 1)
        losses.append(loss.item())
    return losses


# --------------------------------------------------------------------------- freezing


def test_a_frozen_prefix_gets_no_gradient_and_no_backward_below_it():
    model = _all_layer_lora()
    # every interval's change is below an enormous threshold: the prefix freezes up to max_frozen (3 of 6)
    schedule = FreezeSchedule(interval=1, threshold=1e9, min_steps=0, max_frozen=0.5)
    _train(model, schedule, steps=2)
    assert schedule.frozen_blocks == [0, 1, 2]
    frozen_before = {b: _lora(model, b) for b in range(3)}
    training_before = _lora(model, 4)
    counts, _ = _count_backward(model)
    _train(model, schedule, steps=3, seed=1)
    assert set(counts) == {3, 4, 5}, f"backward reached blocks {sorted(counts)}"
    for b in range(3):
        after = _lora(model, b)
        assert all(torch.equal(after[n], frozen_before[b][n]) for n in after), f"frozen block {b} moved"
    assert any(not torch.equal(v, training_before[n]) for n, v in _lora(model, 4).items())
    # frozen adapters stay in what is saved: they were trained
    saved = model.state_dict()
    assert any("layers.0." in n and "lora_B" in n and saved[n].abs().sum() > 0 for n in saved)


def test_freezing_waits_for_the_statistic_and_never_passes_a_block_still_changing():
    model = _all_layer_lora()
    schedule = FreezeSchedule(interval=2, threshold=1e9, min_steps=6, max_frozen=0.5)
    _train(model, schedule, steps=4)
    assert schedule.frozen_blocks == [], "froze before min_steps"
    schedule = FreezeSchedule(interval=1, threshold=1e-12, min_steps=0, max_frozen=0.5)
    _train(_all_layer_lora(), schedule, steps=4)
    assert schedule.frozen_blocks == [], "froze a block whose statistic changed"
    assert all(len(h["change"]) == LAYERS for h in schedule.state.history)


def test_freeze_decisions_are_deterministic_for_a_seed():
    histories = []
    for _ in range(2):
        schedule = FreezeSchedule(interval=2, threshold=0.5, min_steps=2, max_frozen=0.75)
        _train(_all_layer_lora(seed=3), schedule, steps=10)
        histories.append(schedule.state_dict())
    assert histories[0] == histories[1]


def test_bad_freeze_settings_are_refused_with_the_value():
    with pytest.raises(ValueError, match="max_frozen=1"):
        FreezeSchedule(max_frozen=1)
    with pytest.raises(ValueError, match="threshold=0"):
        FreezeSchedule(threshold=0)


def _trainer(model, out, schedule, *, max_steps: int, checkpointing: bool, save_steps: int = 3) -> Trainer:
    args = TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=2, learning_rate=1e-2,
        gradient_checkpointing=checkpointing, save_strategy="steps", save_steps=save_steps, report_to="none",
        remove_unused_columns=False, use_cpu=True, seed=0, data_seed=0, disable_tqdm=True, lr_scheduler_type="linear",
    )  # fmt: skip
    return Trainer(
        model=model, args=args, train_dataset=token_rows(16), data_collator=DataCollator(0),
        callbacks=[TruncatedBackwardCallback(), ScheduleCallback(schedule)],
    )  # fmt: skip


def _freeze():
    return FreezeSchedule(interval=2, threshold=1e9, min_steps=2, max_frozen=0.5)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_trainer_run_resumed_mid_schedule_equals_the_uninterrupted_run(tmp_path, checkpointing):
    reference = _all_layer_lora()
    schedule = _freeze()
    _trainer(reference, tmp_path / "a", schedule, max_steps=6, checkpointing=checkpointing).train()
    assert schedule.frozen_blocks, "the schedule must have frozen something for the test to mean anything"
    state = checkpoint_schedule_state(tmp_path / "a" / "checkpoint-3")
    assert state["kind"] == "freeze" and state["steps_seen"] == 3
    # a run killed after checkpoint-3: its folder holds only what was written up to then
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-3", tmp_path / "b" / "checkpoint-3")
    resumed_schedule = _freeze()
    resumed_schedule.load_state_dict(state)
    resumed = _all_layer_lora()
    _trainer(resumed, tmp_path / "b", resumed_schedule, max_steps=6, checkpointing=checkpointing).train(
        resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-3")
    )
    assert resumed_schedule.state_dict()["history"] == schedule.state_dict()["history"]
    want = {n: p for n, p in reference.named_parameters() if "lora_" in n}
    for name, p in resumed.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(p, want[name], rtol=0, atol=1e-6)


DDP_SCRIPT = """
import json, os, sys
sys.path.insert(0, {tests!r})
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from conftest import saved_workspace, tiny_model, token_rows
from peft import get_peft_model
from aletheia_lora import apply_aletheia_lora
from aletheia_lora.batches import collate
from aletheia_lora.cli import main
from aletheia_lora.schedules import FreezeSchedule
from aletheia_lora.truncation import truncate_backward

torch.set_num_threads(1)
dist.init_process_group("gloo")
rank = dist.get_rank()
base = tiny_model("llama", num_layers=6)
torch.manual_seed(0)
model = get_peft_model(base, apply_aletheia_lora(base, list(range(6)), r=4))
truncate_backward(model)
schedule = FreezeSchedule(interval=2, threshold=0.35, min_steps=2, max_frozen=0.75)
schedule.attach(model)
ddp = DDP(model, find_unused_parameters=True)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
rows = token_rows(40, seed=10 + rank)  # each rank its own data: the local statistics differ
frozen_by_step = []
for step in range(16):
    loss = ddp(**collate(rows[2 * step : 2 * step + 2])).loss
    loss.backward()
    schedule.drop_frozen_grads()
    opt.step()
    opt.zero_grad(set_to_none=True)
    schedule.step_end(step + 1)
    frozen_by_step.append(schedule.state.frozen)
lora = {{n: p.detach().double().sum().item() for n, p in model.named_parameters() if "lora_" in n}}
with open(os.path.join({out!r}, f"rank{{rank}}.json"), "w") as f:
    json.dump({{"frozen_by_step": frozen_by_step, "history": schedule.state.history, "lora": lora}}, f)
"""


def test_two_ddp_ranks_freeze_the_same_blocks_at_the_same_step(tmp_path):
    r0, r1 = both_ranks_succeed(DDP_SCRIPT, tmp_path)
    assert r0["frozen_by_step"] == r1["frozen_by_step"]
    assert r0["history"] == r1["history"]  # the statistic was all-reduced: the same numbers on both ranks
    assert max(r0["frozen_by_step"]) > 0, r0["history"]
    for name in r0["lora"]:  # DDP kept every adapter, frozen or not, identical across ranks
        assert math.isclose(r0["lora"][name], r1["lora"][name], rel_tol=1e-9, abs_tol=1e-12)


# --------------------------------------------------------------------------- dropping


def test_dropping_with_probability_zero_is_all_layer_lora_bit_for_bit():
    plain, dropping = _all_layer_lora(), _all_layer_lora()
    losses = _train(plain, steps=4)
    dropped = _train(dropping, DropSchedule([0.0] * LAYERS, seed=0), steps=4)
    assert losses == dropped
    for (n, a), (_, b) in zip(plain.named_parameters(), dropping.named_parameters()):
        assert torch.equal(a, b), n


def test_a_block_always_dropped_gets_no_gradient_but_the_blocks_below_do():
    model = _all_layer_lora()
    schedule = DropSchedule([0, 0, 0, 1.0, 0, 0], seed=0)
    schedule.attach(model)
    schedule.step_begin(0)
    assert schedule.dropped == {3}
    reference = copy.deepcopy(model)
    schedule_ref = DropSchedule([0.0] * LAYERS)
    schedule_ref.attach(reference)
    batch = collate(token_rows(2))
    out = model(**batch)
    torch.testing.assert_close(out.logits, reference(**batch).logits, rtol=0, atol=0)  # the same forward
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "lora_" in n}
    assert all(g is None for n, g in grads.items() if "layers.3." in n)
    for block in (0, 1, 2, 4, 5):
        assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if f"layers.{block}." in n)


def test_drop_decisions_are_a_function_of_seed_and_step():
    a, b = DropSchedule([0.5] * LAYERS, seed=7), DropSchedule([0.5] * LAYERS, seed=7)
    assert [a.decisions(s) for s in range(20)] == [b.decisions(s) for s in range(20)]
    assert [a.decisions(s) for s in range(20)] != [
        DropSchedule([0.5] * LAYERS, seed=8).decisions(s) for s in range(20)
    ]
    a.step_begin(3)
    b.load_state_dict(a.state_dict())
    assert b.counts == a.counts and b.steps == 1
    with pytest.raises(ValueError, match="drop rates or seed differ"):
        DropSchedule([0.4] * LAYERS, seed=7).load_state_dict(a.state_dict())


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_dropping_trainer_run_resumed_equals_the_uninterrupted_run(tmp_path, checkpointing):
    rates = [0.5] * LAYERS
    reference = _all_layer_lora()
    _trainer(
        reference, tmp_path / "a", DropSchedule(rates, seed=1), max_steps=6, checkpointing=checkpointing
    ).train()
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-3", tmp_path / "b" / "checkpoint-3")
    schedule = DropSchedule(rates, seed=1)
    schedule.load_state_dict(checkpoint_schedule_state(tmp_path / "b" / "checkpoint-3"))
    resumed = _all_layer_lora()
    _trainer(resumed, tmp_path / "b", schedule, max_steps=6, checkpointing=checkpointing).train(
        resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-3")
    )
    assert schedule.steps == 6 and sum(schedule.counts) > 0
    want = dict(reference.named_parameters())
    for name, p in resumed.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(p, want[name], rtol=0, atol=1e-6)


def test_drop_rates_meet_the_cost_target_and_drop_low_scores_more():
    cost = uniform_cost_model(LAYERS, forward=1.0, backward=2.0, lora=0.3)
    scores = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    rates, predicted = drop_rates(scores, list(range(LAYERS)), cost, target_speedup=1.3)
    assert predicted == pytest.approx(1.3, rel=1e-6)
    assert rates == sorted(rates, reverse=True) and rates[0] > rates[-1] > 0
    full = cost.step_cost(range(LAYERS))
    expected = sum(
        r * scheduled_step_cost(cost, range(LAYERS), lowest=0, dropped=[i]) for i, r in enumerate(rates)
    )
    expected += (1 - sum(rates)) * full  # linearity: the expected cost of independent drops
    assert expected == pytest.approx(full / 1.3, rel=1e-6)
    # out of reach: every rate at its cap, and the predicted speedup says what it gives instead
    capped, reachable = drop_rates(scores, list(range(LAYERS)), cost, target_speedup=10, max_rate=0.5)
    assert capped == [0.5] * LAYERS and 1 < reachable < 10
    with pytest.raises(ValueError, match="target_speedup=0.9"):
        drop_rates(scores, list(range(LAYERS)), cost, target_speedup=0.9)


# --------------------------------------------------------------------------- train --schedule


def test_train_with_a_freeze_schedule_records_it_and_resumes_only_with_the_same_schedule(tmp_path, capsys):
    ws = saved_workspace(tmp_path, n_rows=40)
    out = tmp_path / "run"
    common = [*_base(ws), *FAST, "--output_dir", str(out), "--top_pct", "100", "--save_steps", "2",
              "--schedule", "freeze", "--freeze_interval", "1", "--freeze_min_steps", "0",
              "--freeze_threshold", "1e9", "--freeze_max_frozen", "0.5", "--quiet", "true"]  # fmt: skip
    assert main(["train", *common, "--max_steps", "4"]) == 0
    record = json.loads((out / "aletheia.json").read_text())
    assert record["schedule"]["kind"] == "freeze" and record["schedule"]["frozen_blocks"] == [0, 1]
    assert record["settings"]["run"]["schedule"] == "freeze"
    capsys.readouterr()
    # the checkpoint was trained with freezing: resuming it as a static run is refused, in one line
    static = [a for a in common if a not in ("--schedule", "freeze")]
    assert main(["train", *static, "--max_steps", "6", "--resume_from_checkpoint", "true"]) == 1
    err = capsys.readouterr().err
    assert "--schedule static but the checkpoint" in err and "Traceback" not in err
    assert main(["train", *common, "--max_steps", "6", "--resume_from_checkpoint", "true"]) == 0
    resumed = json.loads((out / "aletheia.json").read_text())["schedule"]
    assert resumed["steps_seen"] == 6 and resumed["frozen_blocks"] == [0, 1]


def test_train_with_a_drop_schedule_skips_low_scoring_blocks_more(tmp_path):
    ws = saved_workspace(tmp_path, n_rows=40)
    out = tmp_path / "run"
    args = [*_base(ws), *FAST, "--output_dir", str(out), "--top_pct", "100", "--schedule", "drop",
            "--drop_target_speedup", "1.3", "--max_steps", "6", "--save_strategy", "no", "--quiet", "true"]  # fmt: skip
    assert main(["train", *args]) == 0
    record = json.loads((out / "aletheia.json").read_text())
    rates = record["schedule"]["rates"]
    scores = LayerScores.from_dict(record["plan"]["scores"])
    assert record["schedule"]["steps"] == 6 and all(0 < r <= 0.8 for r in rates)
    low, high = min(scores, key=scores.get), max(scores, key=scores.get)
    assert rates[low] > rates[high]
    with pytest.raises(SystemExit):
        main(["train", *args, "--schedule", "sometimes"])


ACCELERATE_SCRIPT = """
import hashlib, json, os, sys
sys.path.insert(0, {tests!r})
import torch
import torch.distributed as dist
import transformers as T
from conftest import tiny_model, token_rows
from peft import get_peft_model
from aletheia_lora import apply_aletheia_lora
from aletheia_lora.data import DataCollator
from aletheia_lora.schedules import DropSchedule, FreezeSchedule, ScheduleCallback
from aletheia_lora.truncation import TruncatedBackwardCallback, truncate_backward

torch.set_num_threads(1)
out = {{}}
for kind in ("freeze", "drop"):
    args = T.TrainingArguments(
        output_dir=os.path.join({out!r}, kind), use_cpu=True, max_steps=8, seed=0,
        per_device_train_batch_size=2, learning_rate=1e-2, logging_steps=1, save_strategy="no",
        report_to="none", disable_tqdm=True, ddp_find_unused_parameters=True,
    )
    base = tiny_model("llama", num_layers=6)
    torch.manual_seed(0)
    model = get_peft_model(base, apply_aletheia_lora(base, list(range(6)), r=4))
    truncate_backward(model)
    if kind == "freeze":
        schedule = FreezeSchedule(interval=2, threshold=0.35, min_steps=2, max_frozen=0.75)
    else:
        schedule = DropSchedule([0.5] * 6, seed=3)
    trainer = T.Trainer(model=model, args=args, train_dataset=token_rows(64, seed=5), data_collator=DataCollator(0),
                        callbacks=[TruncatedBackwardCallback(), ScheduleCallback(schedule)])
    trainer.train()
    digest = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if "lora_" in name:
            digest.update(p.detach().double().numpy().tobytes())
    out[kind] = {{"state": schedule.state_dict(), "lora_sha256": digest.hexdigest(),
                 "wrapped": type(trainer.model_wrapped).__name__}}
with open(os.path.join({out!r}, f"rank{{dist.get_rank()}}.json"), "w") as f:
    json.dump(out, f)
"""


def test_under_accelerate_ddp_every_rank_freezes_and_drops_the_same_blocks(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from ranks import TESTS, TIMEOUT, clean_exit_argv, free_port, rank_env

    script = tmp_path / "script.py"
    script.write_text(ACCELERATE_SCRIPT.format(tests=str(TESTS), out=str(tmp_path)))
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           *clean_exit_argv(script)]  # fmt: skip
    proc = subprocess.run(
        cmd, env=rank_env(ACCELERATE_USE_CPU="true"), capture_output=True, text=True, timeout=TIMEOUT
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    for kind in ("freeze", "drop"):
        assert r0[kind]["wrapped"] == "DistributedDataParallel"
        assert r0[kind]["state"] == r1[kind]["state"], kind  # the same decisions at the same steps
        assert r0[kind]["lora_sha256"] == r1[kind]["lora_sha256"], kind  # and the same adapters
    assert r0["freeze"]["state"]["frozen"] > 0, r0["freeze"]["state"]["history"]
    assert r0["drop"]["state"]["steps"] == 8 and sum(r0["drop"]["state"]["counts"]) > 0
