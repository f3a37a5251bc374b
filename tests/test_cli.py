"""The `aletheia-lora` command line end to end: `aletheia_lora.cli.main([...])` in-process and
`python -m aletheia_lora` in a subprocess, on a tiny Llama saved to disk with a word-level
tokenizer, plus one run on the embedded SmolLM2-135M."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import qa_rows, tiny_model, word_tokenizer, write_jsonl
from safetensors import safe_open
from safetensors.torch import load_file

from aletheia_lora.cli import main
from aletheia_lora.scores import LayerScores
from aletheia_lora.selection import select_layers
from aletheia_lora.train import load_plan

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_LAYER = re.compile(r"\.layers\.(\d+)\.")
# Small settings that keep every tiny-model run to a few seconds.
FAST = ["--per_device_train_batch_size", "2", "--max_length", "32", "--eval_generate", "2",
        "--max_eval_samples", "4", "--probe_batches", "2", "--disable_tqdm", "true"]  # fmt: skip


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A tiny 4-layer Llama + word tokenizer (no chat template) in ``model/`` and 40 Q/A rows."""
    root = tmp_path_factory.mktemp("cli")
    tiny_model("llama", num_layers=4).save_pretrained(root / "model")
    tokenizer = word_tokenizer()
    assert not tokenizer.chat_template  # so data.format_prompt uses "Question: ...\nAnswer: "
    tokenizer.save_pretrained(root / "model")
    write_jsonl(root / "data.jsonl", qa_rows(40, seed=0))
    return root


def _base(ws: Path, data: Path | None = None) -> list[str]:
    return ["--model", str(ws / "model"), "--data", str(data or ws / "data.jsonl")]


def _tree(folder: Path) -> dict[str, tuple[bytes | None, int]]:
    """Every entry under ``folder`` (and the folder itself) -> (content for files, mtime_ns)."""
    out = {".": (None, folder.stat().st_mtime_ns)}
    for p in sorted(folder.rglob("*")):
        out[str(p.relative_to(folder))] = (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
    return out


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


# --------------------------------------------------------------------------- probe


def test_probe_writes_scores_and_plot_and_prints_chart(workspace, tmp_path, capsys):
    out = tmp_path / "probe"
    rc = main(["probe", *_base(workspace), "--output_dir", str(out), "--probe_batches", "3",
               "--max_length", "32", "--top_pct", "50"])  # fmt: skip
    assert rc == 0
    scores = LayerScores.from_json(out / "layer_scores.json")
    assert sorted(scores) == [0, 1, 2, 3]
    assert all(math.isfinite(v) and v > 0 for v in scores.values())
    assert scores.meta["batches"] == 3
    assert scores.meta["selected_layers"] == select_layers(scores, 50)
    assert len(scores.meta["selected_layers"]) == 2
    assert (out / "layer_scores.png").read_bytes().startswith(PNG_MAGIC)

    printed = capsys.readouterr().out
    assert printed.count("◀ selected") == 2
    assert "2 of 4 layers selected" in printed
    assert "layer_scores.json" in printed and str(out) in printed


def test_probe_honours_the_strategy(workspace, tmp_path):
    out = tmp_path / "probe-last"
    rc = main(["probe", *_base(workspace), "--output_dir", str(out), "--probe_batches", "2",
               "--max_length", "32", "--strategy", "last", "--quiet", "true"])  # fmt: skip
    assert rc == 0
    assert LayerScores.from_json(out / "layer_scores.json").meta["selected_layers"] == [2, 3]


def test_probe_quiet_prints_nothing(workspace, tmp_path, capsys):
    rc = main(["probe", *_base(workspace), "--output_dir", str(tmp_path / "p"), "--probe_batches", "1",
               "--max_length", "16", "--quiet", "true"])  # fmt: skip
    assert rc == 0
    assert capsys.readouterr().out == ""
    assert (tmp_path / "p" / "layer_scores.json").is_file()


# --------------------------------------------------------------------------- train


@pytest.fixture(scope="module")
def trained(workspace, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train") / "run"
    rc = main(["train", *_base(workspace), "--output_dir", str(out), *FAST, "--max_steps", "3",
               "--save_steps", "2", "--logging_steps", "1", "--learning_rate", "1e-2", "--merge", "true",
               "--quiet", "true"])  # fmt: skip
    assert rc == 0
    return out


def test_train_writes_adapter_plan_plots_and_report(trained):
    for name in ("adapter_model.safetensors", "adapter_config.json", "aletheia.json", "layer_scores.png",
                 "loss.png", "report.md", "merged/config.json", "merged/model.safetensors"):  # fmt: skip
        assert (trained / name).is_file(), name
    # the default keeps the last checkpoint only, and the run says what it kept
    assert (trained / "checkpoint-3").is_dir() and not (trained / "checkpoint-2").exists()
    for png in ("layer_scores.png", "loss.png"):
        assert (trained / png).read_bytes().startswith(PNG_MAGIC)
    assert not [p.name for p in trained.iterdir() if p.name.startswith(".")]  # no temp leftovers

    record = json.loads((trained / "aletheia.json").read_text())
    plan = record["plan"]
    scores = LayerScores.from_dict(plan["scores"])
    assert sorted(scores) == [0, 1, 2, 3] and plan["num_layers"] == 4
    assert plan["selected_layers"] == select_layers(scores, 50)
    assert plan["probe_seconds"] > 0
    assert plan["config"]["probe_batches"] == 2 and plan["config"]["seed"] == 42
    assert record["seed"] == 42
    assert set(record["settings"]) >= {"model", "data", "aletheia", "run", "training"}
    assert record["settings"]["data"]["format"] == "question_answer"
    assert record["settings"]["training"]["max_steps"] == 3
    assert record["settings"]["training"]["learning_rate"] == 1e-2
    assert record["settings"]["run"]["merge"] is True
    for key in ("aletheia_lora", "torch", "transformers", "peft", "python"):
        assert record["versions"][key]
    assert record["train_steps"] == 3
    assert record["train_seconds_per_step"] > 0
    assert [h["step"] for h in record["log_history"] if "loss" in h] == [1, 2, 3]
    for when in ("metrics_before", "metrics_after"):
        assert math.isfinite(record[when]["eval_loss"])
        assert record[when]["exact_match_n"] == 2
    assert record["metrics_after"]["eval_loss"] != record["metrics_before"]["eval_loss"]
    assert [c["folder"] for c in record["checkpoints"]] == ["checkpoint-3"] and record["checkpoints"][0][
        "bytes"
    ] > 0
    report = (trained / "report.md").read_text()
    assert "checkpoint-3/ (" in report and "--save_total_limit" in report
    assert "How: exact match: greedy answers to 2 held-out questions" in report

    again = load_plan(trained)
    assert again.selected_layers == plan["selected_layers"] and again.scores == scores

    report = (trained / "report.md").read_text()
    assert "selected layers" in report
    assert f"2 of 4: {', '.join(map(str, plan['selected_layers']))}" in report
    assert "adapter_model.safetensors" in report


def test_train_adapter_reloads_and_matches_merged_model(workspace, trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    selected = json.loads((trained / "aletheia.json").read_text())["plan"]["selected_layers"]
    assert json.loads((trained / "adapter_config.json").read_text())["layers_to_transform"] == selected
    with safe_open(trained / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and all("lora_" in k for k in keys)
    assert {int(_LAYER.search(k).group(1)) for k in keys} == set(selected)

    ids = torch.tensor([[1, 4, 6, 8, 9, 4, 10, 3, 3, 19, 7]])
    base = AutoModelForCausalLM.from_pretrained(workspace / "model")
    base_logits = _logits(base, ids)
    adapted = _logits(PeftModel.from_pretrained(base, trained), ids)
    merged = _logits(AutoModelForCausalLM.from_pretrained(trained / "merged"), ids)

    assert (adapted - base_logits).abs().max() > 1e-3  # the adapter is not a no-op
    torch.testing.assert_close(adapted, merged, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def resumed(workspace, tmp_path_factory) -> dict:
    """A run "interrupted" after 2 steps (checkpoint-2), then resumed to 4 steps on changed data."""
    root = tmp_path_factory.mktemp("resume")
    out = root / "run"
    common = [*FAST, "--output_dir", str(out), "--save_steps", "2", "--logging_steps", "1", "--quiet", "true"]
    assert main(["train", *_base(workspace), *common, "--max_steps", "2"]) == 0
    first = json.loads((out / "aletheia.json").read_text())
    assert (out / "checkpoint-2").is_dir()
    checkpoint_2 = load_file(out / "checkpoint-2" / "adapter_model.safetensors")

    # Different data now: a re-probe would measure new scores (and a new probe time).
    other = write_jsonl(root / "other.jsonl", qa_rows(40, seed=7, words=9))
    rc = main(
        ["train", *_base(workspace, other), *common, "--max_steps", "4", "--resume_from_checkpoint", "true"]
    )
    assert rc == 0
    return {"out": out, "first": first, "checkpoint_2": checkpoint_2, "other": other}


def test_train_calibrates_the_cost_model_at_the_training_shape_and_resume_keeps_it(
    workspace, tmp_path, capsys
):
    out = tmp_path / "cal"
    common = [*_base(workspace), *FAST, "--output_dir", str(out), "--save_steps", "1", "--strategy", "depth-aware",
              "--calibrate_cost", "true"]  # fmt: skip
    assert main(["train", *common, "--max_steps", "1"]) == 0
    printed = capsys.readouterr().out
    first = json.loads((out / "aletheia.json").read_text())
    plan, settings = first["plan"], first["settings"]["aletheia"]
    assert (settings["calibrate_batch_size"], settings["calibrate_seq_len"]) == (
        2,
        32,
    )  # FAST's batch and length
    assert len(plan["calibration"]["points"]) == 3 and all(
        p["measured_s"] > 0 for p in plan["calibration"]["points"]
    )
    assert "calibrating the cost model: 3 selections x a few steps of 2 x 32 tokens" in printed
    note = "(cost model calibrated on this machine on 3 timed selections)"
    assert f"predicted {plan['predicted_speedup']:.2f}x faster per step than all-layer LoRA {note}" in printed
    assert note in (out / "report.md").read_text()

    assert (
        main(["train", *common, "--max_steps", "2", "--resume_from_checkpoint", "true", "--quiet", "true"])
        == 0
    )
    second = json.loads((out / "aletheia.json").read_text())["plan"]
    assert second["calibration"] == plan["calibration"]  # not re-timed on resume
    assert second["predicted_speedup"] == plan["predicted_speedup"]
    assert second["selected_layers"] == plan["selected_layers"]


def test_resume_keeps_the_saved_selection_without_reprobing(resumed):
    out, first = resumed["out"], resumed["first"]
    second = json.loads((out / "aletheia.json").read_text())

    assert second["plan"]["selected_layers"] == first["plan"]["selected_layers"]
    assert second["plan"]["scores"] == first["plan"]["scores"]
    assert second["plan"]["probe_seconds"] == first["plan"]["probe_seconds"]
    assert second["train_steps"] == 4 and (out / "checkpoint-4").is_dir()
    # steps 1-2 come from the checkpoint's state, not from training again
    losses = {h["step"]: h["loss"] for h in second["log_history"] if "loss" in h}
    assert sorted(losses) == [1, 2, 3, 4]
    assert [losses[1], losses[2]] == [h["loss"] for h in first["log_history"] if "loss" in h]

    final = load_file(out / "adapter_model.safetensors")
    assert {int(_LAYER.search(k).group(1)) for k in final} == set(first["plan"]["selected_layers"])
    # Training went on from checkpoint-2's weights: two more AdamW steps at lr 2e-4 move each
    # weight by about 4e-4, while a fresh LoRA initialisation would differ by ~0.1.
    start = resumed["checkpoint_2"]
    assert sorted(final) == sorted(start)
    assert max((final[k] - start[k]).abs().max().item() for k in final) < 5e-3


def test_resume_of_a_finished_run_keeps_selection_and_step_count(workspace, resumed, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(resumed["out"], out)
    (out / "checkpoint-6").mkdir()  # a save torn by a crash (no trainer_state.json): must be ignored
    (out / "checkpoint-6" / "adapter_config.json").write_text("{}")
    common = [*FAST, "--output_dir", str(out), "--save_steps", "2", "--logging_steps", "1", "--quiet", "true"]
    before = json.loads((out / "aletheia.json").read_text())
    rc = main(["train", *_base(workspace, resumed["other"]), *common, "--max_steps", "4",
               "--resume_from_checkpoint", "true"])  # fmt: skip
    assert rc == 0
    after = json.loads((out / "aletheia.json").read_text())
    assert after["plan"] == before["plan"]  # same selection, scores and probe time: no re-probe
    # The run had already done its 4 steps: resuming must not train past --max_steps.
    assert after["train_steps"] == 4
    assert not (out / "checkpoint-5").exists()


def test_same_seed_gives_the_same_adapter(workspace, tmp_path):
    args = [*FAST, "--max_steps", "1", "--save_steps", "100", "--quiet", "true", "--seed", "42"]
    for name, caller_seed in (("a", 1), ("b", 2)):
        torch.manual_seed(caller_seed)  # whatever global RNG state the caller (or a new process) has
        assert main(["train", *_base(workspace), *args, "--output_dir", str(tmp_path / name)]) == 0
    a = load_file(tmp_path / "a" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter_model.safetensors")
    plan_a = json.loads((tmp_path / "a" / "aletheia.json").read_text())["plan"]
    plan_b = json.loads((tmp_path / "b" / "aletheia.json").read_text())["plan"]
    assert plan_a["selected_layers"] == plan_b["selected_layers"]
    assert sorted(a) == sorted(b)
    # The LoRA A matrices are random at initialisation; --seed must fix them.
    diff = {k: (a[k] - b[k]).abs().max().item() for k in a}
    assert max(diff.values()) < 1e-6, {k: v for k, v in diff.items() if v >= 1e-6}


def test_resume_without_checkpoint_is_an_error(workspace, tmp_path, capsys):
    out = tmp_path / "empty"
    out.mkdir()
    rc = main(["train", *_base(workspace), "--output_dir", str(out), "--resume_from_checkpoint", "true"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "checkpoint" in err and str(out) in err
    assert list(out.iterdir()) == []


# --------------------------------------------------------------------------- refusals and errors


def test_non_empty_output_dir_is_refused_untouched_then_overwritten(workspace, tmp_path, capsys):
    out = tmp_path / "busy"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("keep me")
    (out / "sub" / "adapter_model.safetensors").write_bytes(b"old")
    os.utime(out, ns=(1_000_000_000, 1_000_000_000))  # a distinct, old mtime on the folder
    before = _tree(out)

    for cmd in ("train", "probe"):
        rc = main([cmd, *_base(workspace), "--output_dir", str(out), "--max_steps", "1", "--quiet", "true"]
                  if cmd == "train" else [cmd, *_base(workspace), "--output_dir", str(out)])  # fmt: skip
        assert rc == 1, cmd
        err = capsys.readouterr().err
        assert "not empty" in err and "--overwrite_output_dir" in err and str(out) in err
        assert _tree(out) == before, cmd

    rc = main(["train", *_base(workspace), "--output_dir", str(out), *FAST, "--max_steps", "1",
               "--save_steps", "100", "--quiet", "true", "--overwrite_output_dir", "true"])  # fmt: skip
    assert rc == 0
    assert (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "aletheia.json").read_text())["train_steps"] == 1
    assert (out / "notes.txt").read_text() == "keep me"


def test_missing_data_file_names_it(workspace, tmp_path, capsys):
    missing = tmp_path / "nowhere" / "my-train.jsonl"
    rc = main(["train", *_base(workspace, missing), "--output_dir", str(tmp_path / "o"), "--quiet", "true"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "aletheia-lora train: error:" in err and str(missing) in err


def test_malformed_jsonl_names_file_and_line(workspace, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    good = [json.dumps(r) for r in qa_rows(4, seed=1)]
    bad.write_text("\n".join([good[0], good[1], '{"question": "the cat", "answer": ', good[2]]) + "\n")
    rc = main(["probe", *_base(workspace, bad), "--output_dir", str(tmp_path / "o"), "--quiet", "true"])
    assert rc == 1
    err = capsys.readouterr().err
    assert str(bad) in err and "line 3" in err


def test_hub_id_offline_fails_fast_with_a_local_path_hint(workspace, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    cmd = [sys.executable, "-m", "aletheia_lora", "train", "--model", "aletheia-tests/no-such-model",
           "--data", str(workspace / "data.jsonl"), "--output_dir", str(tmp_path / "o"), "--quiet", "true"]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert elapsed < 20
    assert "aletheia-tests/no-such-model" in proc.stderr
    assert "offline" in proc.stderr.lower()
    assert "folder path" in proc.stderr and "./my-model" in proc.stderr
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- config files


def test_yaml_config_supplies_flags_and_explicit_flags_win(workspace, tmp_path):
    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {workspace / 'model'}\n"
        f"data: {workspace / 'data.jsonl'}\n"
        "max_steps: 5\n"
        "learning_rate: 0.005\n"
        "top_pct: 25\n"
        "probe_batches: 2\n"
        "per_device_train_batch_size: 2\n"
        "max_length: 32\n"
        "eval_generate: 1\n"
        "max_eval_samples: 2\n"
        "save_steps: 100\n"
        "disable_tqdm: true\n"
        "quiet: true\n"
    )
    rc = main(
        ["train", "--config", str(config), "--output_dir", str(out), "--max_steps", "1", "--top_pct", "50"]
    )
    assert rc == 0
    record = json.loads((out / "aletheia.json").read_text())
    assert record["settings"]["training"]["learning_rate"] == 0.005  # from the file
    assert record["settings"]["aletheia"]["probe_batches"] == 2  # from the file
    assert record["settings"]["run"]["quiet"] is True  # a boolean from the file
    assert record["train_steps"] == 1  # explicit flag beat the file's 5
    assert record["settings"]["aletheia"]["top_pct"] == 50  # explicit flag beat the file's 25
    assert len(record["plan"]["selected_layers"]) == 2


def test_json_config_supplies_flags_and_explicit_flags_win(workspace, tmp_path, capsys):
    out = tmp_path / "probe"
    config = tmp_path / "probe.json"
    config.write_text(json.dumps({
        "model": str(workspace / "model"), "data": str(workspace / "data.jsonl"), "probe_batches": 3,
        "top_pct": 25, "max_length": 16, "quiet": True,
    }))  # fmt: skip
    rc = main(["probe", "--top_pct", "75", "--config", str(config), "--output_dir", str(out)])
    assert rc == 0
    scores = LayerScores.from_json(out / "layer_scores.json")
    assert scores.meta["batches"] == 3  # from the file
    assert len(scores.meta["selected_layers"]) == 3  # 75 % of 4 layers: the explicit flag won
    assert capsys.readouterr().out == ""  # quiet from the file


def test_config_flag_with_equals_sign(workspace, tmp_path):
    config = tmp_path / "probe.json"
    config.write_text(json.dumps({"model": str(workspace / "model"), "data": str(workspace / "data.jsonl"),
                                  "probe_batches": 1, "max_length": 16, "quiet": True}))  # fmt: skip
    rc = main(["probe", f"--config={config}", "--output_dir", str(tmp_path / "o")])  # like --max_steps=3
    assert rc == 0
    assert LayerScores.from_json(tmp_path / "o" / "layer_scores.json").meta["batches"] == 1


def test_missing_config_file(tmp_path):
    with pytest.raises(SystemExit, match="no such file"):
        main(["probe", "--config", str(tmp_path / "nope.yaml"), "--output_dir", str(tmp_path / "o")])


# --------------------------------------------------------------------------- usage


@pytest.mark.parametrize("argv", [["frobnicate"], [], ["--output_dir", "x"]])
def test_unknown_or_missing_subcommand_exits_2_with_usage(argv, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "usage: aletheia-lora {probe,train,demo,bench,eval,study,oracle,race}" in captured.err
    assert captured.out == ""


def test_subcommand_help_lists_library_and_trainer_flags(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--top_pct", "--mlp_r", "--probe_batches", "--learning_rate", "--max_steps", "--merge"):
        assert flag in text
    usage = text.split("\n\n")[0]
    assert len(usage.splitlines()) <= 2, usage  # a usage line, not every flag
    headings = [
        line for line in text.splitlines() if line and not line.startswith(" ") and line.endswith(":")
    ]
    names = [h.split(" (")[0].rstrip(":") for h in headings]
    assert names == [
        "options",
        "model",
        "data",
        "probe, selection and LoRA",
        "output",
        "transformers.TrainingArguments",
    ]
    flat = " ".join(text.split())  # argparse wraps lines
    assert "(default: the checkpoint's;" in flat and ". (default: None)" not in flat  # no doubled defaults
    no_flag = text[text.index("--no_truncate_backward") :].split("\n  --")[0]
    assert "Turn off --truncate_backward" in no_flag and "Never back-propagate" not in no_flag


def test_eval_of_a_run_scores_its_held_out_rows_with_trains_numbers(trained, tmp_path, capsys):
    # the adapter's own folder: eval finds the data, the held-out split and the base model in aletheia.json
    assert (
        main(["eval", "--adapter", str(trained), "--suites", "task", "--output_dir", str(tmp_path / "e")])
        == 0
    )
    record = json.loads((tmp_path / "e" / "eval.json").read_text())
    run = json.loads((trained / "aletheia.json").read_text())
    task, after = record["suites"]["task"], run["metrics_after"]
    assert task["nll"] == pytest.approx(after["eval_loss"], rel=1e-5)
    assert (
        task["exact_match"] == after["exact_match"] and task["exact_match_n"] == after["exact_match_n"] == 2
    )
    assert record["task_data"]["dataset"].endswith("data.jsonl")
    assert "held-out" in record["task_data"]["split"] and record["task_data"]["rows"] == 2
    err = capsys.readouterr().err
    assert "task: " in err and "data.jsonl" in err and "held-out" in err  # said on the console too
    md = (tmp_path / "e" / "eval.md").read_text()
    assert "task data: " in md and "data.jsonl" in md and "hit the limit unfinished" in md


def test_eval_refuses_to_score_training_rows_of_a_file_without_a_test_split(
    workspace, trained, tmp_path, capsys
):
    other = write_jsonl(tmp_path / "other.jsonl", qa_rows(6, seed=3))
    argv = ["eval", "--adapter", str(trained), "--suites", "task", "--data", str(other)]
    assert main([*argv, "--output_dir", str(tmp_path / "e")]) == 1
    assert "--allow_training_rows" in capsys.readouterr().err and not (tmp_path / "e").exists()
    assert main([*argv, "--allow_training_rows", "true", "--output_dir", str(tmp_path / "f")]) == 0
    assert json.loads((tmp_path / "f" / "eval.json").read_text())["task_data"]["rows"] == 6


def test_a_small_held_out_set_is_warned_about(workspace, tmp_path):
    with pytest.warns(UserWarning, match=r"only 2 held-out rows.*--eval_fraction"):
        rc = main(["train", *_base(workspace), "--output_dir", str(tmp_path / "o"), *FAST, "--max_steps", "1",
                   "--quiet", "true"])  # fmt: skip
    assert rc == 0


def test_python_dash_m_help_exits_0():
    proc = subprocess.run(
        [sys.executable, "-m", "aletheia_lora", "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0
    assert "usage: aletheia-lora {probe,train,demo,bench,eval,study,oracle,race}" in proc.stdout
    assert "probe" in proc.stdout and "train" in proc.stdout


# --------------------------------------------------------------------------- the embedded model


def test_train_on_the_embedded_smollm2(tmp_path):
    out = tmp_path / "embedded"
    rc = main(["train", "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "2",
               "--max_length", "64", "--probe_batches", "2", "--eval_generate", "2", "--max_eval_samples", "4",
               "--max_train_samples", "16", "--quiet", "true", "--save_steps", "100"])  # fmt: skip
    assert rc == 0
    assert (out / "adapter_model.safetensors").stat().st_size > 0
    record = json.loads((out / "aletheia.json").read_text())
    assert record["plan"]["num_layers"] == 30
    assert sorted(int(k) for k in record["plan"]["scores"]["scores"]) == list(range(30))
    assert len(record["plan"]["selected_layers"]) == 15
    assert record["train_steps"] == 2
    assert record["metrics_before"]["exact_match_n"] == 2
    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        layers = {int(_LAYER.search(k).group(1)) for k in f.keys()}
    assert layers == set(record["plan"]["selected_layers"])


@pytest.mark.parametrize("key", ["trust_remote_code", "overwrite_output_dir"])
def test_a_config_file_cannot_grant_permissions(workspace, tmp_path, key):
    out = tmp_path / "o"
    config = tmp_path / "shared.yaml"
    config.write_text(f"model: {workspace / 'model'}\ndata: {workspace / 'data.jsonl'}\n{key}: true\n")
    with pytest.raises(SystemExit, match=f"cannot grant permissions. Pass --{key} true on the command line"):
        main(["probe", "--config", str(config), "--output_dir", str(out)])
    assert not out.exists()
    config.write_text(f"model: {workspace / 'model'}\ndata: {workspace / 'data.jsonl'}\n{key}: false\n"
                      "probe_batches: 1\nmax_length: 16\nquiet: true\n")  # fmt: skip
    assert main(["probe", "--config", str(config), "--output_dir", str(out)]) == 0  # false is fine


def test_every_file_train_writes_lies_under_output_dir(workspace, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    before = {p for p in tmp_path.rglob("*")}
    out = tmp_path / "elsewhere" / ".." / "run"  # a path with "..": still one folder
    rc = main(["train", *_base(workspace), "--output_dir", str(out), "--max_steps", "2", "--save_steps", "1",
               "--merge", "true", "--quiet", "true", *FAST])  # fmt: skip
    assert rc == 0
    new = {p for p in tmp_path.rglob("*")} - before
    assert new and all(p.resolve().is_relative_to((tmp_path / "run").resolve()) for p in new), sorted(new)
