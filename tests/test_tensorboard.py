"""`train --report_to tensorboard`: the Trainer's event files hold the loss, and beside it the probe's
per-layer scores, the selected layers and the speed lines, read back with TensorBoard's EventAccumulator."""

from __future__ import annotations

import json

import pytest
from conftest import qa_rows, tiny_model, word_tokenizer, write_jsonl

from aletheia_lora.cli import main

pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install tensorboard)")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def _events(out) -> EventAccumulator:
    files = sorted(out.rglob("events.out.tfevents.*"))
    assert len({f.parent for f in files}) == 1, f"one run folder expected, got {files}"
    acc = EventAccumulator(str(files[0].parent), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _text(acc: EventAccumulator, tag: str) -> str:
    return acc.Tensors(f"{tag}/text_summary")[-1].tensor_proto.string_val[0].decode()


def test_train_report_to_tensorboard_logs_scores_selection_and_speed(tmp_path):
    tiny_model("llama", num_layers=4).save_pretrained(tmp_path / "model")
    word_tokenizer().save_pretrained(tmp_path / "model")
    data = write_jsonl(tmp_path / "data.jsonl", qa_rows(16, seed=0))
    out = tmp_path / "run"
    rc = main(["train", "--model", str(tmp_path / "model"), "--data", str(data), "--output_dir", str(out),
               "--report_to", "tensorboard", "--max_steps", "3", "--logging_steps", "1",
               "--per_device_train_batch_size", "2", "--max_length", "32", "--eval_generate", "0",
               "--max_eval_samples", "4", "--probe_batches", "2", "--top_k", "2", "--save_strategy", "no",
               "--quiet", "true", "--use_cpu", "true"])  # fmt: skip
    assert rc == 0
    plan = json.loads((out / "aletheia.json").read_text())["plan"]
    acc = _events(out)
    tags = acc.Tags()
    assert "train/loss" in tags["scalars"]  # the Trainer's own logging, same run folder

    scores = {e.step: e.value for e in acc.Scalars("aletheia/layer_score")}
    want = {int(k): v for k, v in plan["scores"]["scores"].items()}
    assert scores.keys() == want.keys() == {0, 1, 2, 3}
    for layer in want:
        assert scores[layer] == pytest.approx(want[layer], rel=1e-6)
    selected = {e.step for e in acc.Scalars("aletheia/selected") if e.value == 1.0}
    assert selected == set(plan["selected_layers"]) and len(selected) == 2
    assert "aletheia/signal/grad-norm" in tags["scalars"]

    selection = _text(acc, "aletheia/selection")
    assert f"adapting layers {sorted(plan['selected_layers'])} of 4" in selection
    assert "| layer | grad-norm | adapted |" in _text(acc, "aletheia/layer_scores")
    assert acc.Scalars("aletheia/predicted_speedup")[0].value == pytest.approx(plan["predicted_speedup"])
    (per_step,) = acc.Scalars("aletheia/seconds_per_step")
    assert per_step.step == 3 and per_step.value > 0
    assert "s/step" in _text(acc, "aletheia/speed")
