"""Crash safety: `python -m aletheia_lora train` is SIGKILLed at several points of a run; the output
directory must never hold a torn file, and `--resume_from_checkpoint true` must finish the run with
the same selection and the same adapter as a run that was never interrupted."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_model, word_tokenizer
from safetensors.torch import load_file

WORDS = "the a cat dog sat on mat and ran to is was big small red blue one two".split()
ARGS = ["--max_steps", "6", "--save_steps", "2", "--per_device_train_batch_size", "2", "--max_length", "32",
        "--eval_generate", "2", "--max_eval_samples", "4", "--probe_batches", "2", "--disable_tqdm", "true",
        "--quiet", "true", "--seed", "42", "--logging_steps", "1"]  # fmt: skip
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("crash")
    tiny_model("llama", num_layers=4).save_pretrained(root / "model")
    word_tokenizer().save_pretrained(root / "model")
    rng = random.Random(0)
    with open(root / "data.jsonl", "w") as f:
        for _ in range(40):
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            question = " ".join(rng.choice(WORDS) for _ in range(5)) + f" {a} and {b}"
            f.write(json.dumps({"question": question, "answer": f"the {a + b}\n#### {a + b}"}) + "\n")
    return root


def _command(ws: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "aletheia_lora", "train", "--model", str(ws / "model"),
            "--data", str(ws / "data.jsonl"), "--output_dir", str(out), *ARGS, *extra]  # fmt: skip


def _run(ws: Path, out: Path, *extra: str, rc: int = 0) -> str:
    done = subprocess.run(_command(ws, out, *extra), env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == rc, done.stderr[-3000:]
    return done.stderr


def _kill_when(ws: Path, out: Path, ready, delay: float = 0.0) -> None:
    """Start a run, poll every 2 ms until ``ready(out)`` is true, wait ``delay`` s, then SIGKILL it."""
    proc = subprocess.Popen(_command(ws, out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not ready(out):
            assert proc.poll() is None, "the run ended before the kill point"
            assert time.monotonic() < deadline, "kill point never reached"
            time.sleep(0.002)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, (
        f"the run exited on its own ({proc.returncode}) before the kill"
    )


def _assert_nothing_torn(out: Path) -> None:
    """Every file a reader would trust loads: the final adapter and plan if present, and every
    checkpoint that Trainer marked complete (it writes trainer_state.json last)."""
    if (out / "adapter_model.safetensors").exists():
        load_file(out / "adapter_model.safetensors")
    if (out / "aletheia.json").exists():
        json.loads((out / "aletheia.json").read_text())
    for checkpoint in out.glob("checkpoint-*"):
        if (checkpoint / "trainer_state.json").is_file():
            json.loads((checkpoint / "trainer_state.json").read_text())
            assert load_file(checkpoint / "adapter_model.safetensors")


def _selection(out: Path) -> list[int]:
    return json.loads((out / "aletheia.json").read_text())["plan"]["selected_layers"]


@pytest.fixture(scope="module")
def reference(workspace, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    _run(workspace, out)
    return out


def _checkpoint_appeared(step: int):
    return lambda out: (out / f"checkpoint-{step}").exists()


def _checkpoint_complete_then_random(step: int):
    return lambda out: (out / f"checkpoint-{step}" / "trainer_state.json").exists()


def _final_save_started(out: Path) -> bool:
    return out.is_dir() and (
        any(p.name.startswith(".adapter-") for p in out.iterdir())
        or (out / "adapter_model.safetensors").exists()
    )


KILL_POINTS = {
    # the moment Trainer creates checkpoint-2: its files are being written, none is complete yet
    "checkpoint-2 appears": (_checkpoint_appeared(2), 0.0),
    # checkpoint-2 complete, checkpoint-4 being written: the torn one must be passed over
    "checkpoint-4 appears": (_checkpoint_appeared(4), 0.0),
    # a seeded random instant after checkpoint-2 is complete: mid-step, mid-save or mid-rotation
    "random delay after checkpoint-2": (
        _checkpoint_complete_then_random(2),
        random.Random(7).uniform(0, 0.4),
    ),
    # while the final adapter is moved into place (or right after)
    "final save": (_final_save_started, 0.0),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_leaves_no_torn_files_and_resume_matches_an_uninterrupted_run(
    workspace, reference, tmp_path, point
):
    ready, delay = KILL_POINTS[point]
    out = tmp_path / "run"
    _kill_when(workspace, out, ready, delay)
    _assert_nothing_torn(out)

    if any((p / "trainer_state.json").is_file() for p in out.glob("checkpoint-*")):
        _run(workspace, out, "--resume_from_checkpoint", "true")
    else:  # killed before any checkpoint was complete: resuming says so, and a fresh start recovers
        err = _run(workspace, out, "--resume_from_checkpoint", "true", rc=1)
        assert "no complete checkpoint-* folder" in err
        _run(workspace, out, "--overwrite_output_dir", "true")
    _assert_nothing_torn(out)
    assert _selection(out) == _selection(reference)
    record = json.loads((out / "aletheia.json").read_text())
    assert record["train_steps"] == 6
    expected = load_file(reference / "adapter_model.safetensors")
    got = load_file(out / "adapter_model.safetensors")
    assert sorted(got) == sorted(expected)
    diff = {k: (got[k] - expected[k]).abs().max().item() for k in got}
    assert all(torch.allclose(got[k], expected[k], atol=1e-6, rtol=0) for k in got), diff


def test_ctrl_c_exits_130_with_a_resume_hint_and_resume_matches(workspace, reference, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        _command(workspace, out),
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        # as in a terminal: a suite started in the background (`cmd &`) inherits SIGINT ignored,
        # and a Python started with SIGINT ignored never raises KeyboardInterrupt
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint-2" / "trainer_state.json").exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.002)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    err = err.decode()
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted" in err and "Traceback" not in err
    assert "--resume_from_checkpoint true" in err and "checkpoint-" in err
    _assert_nothing_torn(out)

    _run(workspace, out, "--resume_from_checkpoint", "true")
    assert _selection(out) == _selection(reference)
    expected = load_file(reference / "adapter_model.safetensors")
    got = load_file(out / "adapter_model.safetensors")
    assert all(torch.allclose(got[k], expected[k], atol=1e-6, rtol=0) for k in expected)
