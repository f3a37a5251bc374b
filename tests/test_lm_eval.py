"""The lm-evaluation-harness bridge, run for real on a local multiple-choice task and a tiny random Llama."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model, word_tokenizer

from aletheia_lora.lm_eval_bridge import run_lm_eval

# question, choices, index of the right choice: words the conftest word tokenizer knows
DOCS = [
    ("the cat sat on the", ["mat", "dog", "red"], 0),
    ("a dog ran to the", ["cat", "mat", "blue"], 1),
    ("the mat is", ["big", "small", "red"], 2),
    ("one and one is", ["two", "one", "a"], 0),
    ("the red dog was", ["small", "big", "on"], 1),
    ("a blue cat ran to a", ["dog", "mat", "cat"], 1),
    ("the small cat is on the", ["mat", "dog", "two"], 0),
    ("two and two is", ["one", "red", "two"], 2),
]
TASK = "aletheia_tiny_mc"


def write_task(folder) -> None:
    data = folder / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps({"q": q, "choices": c, "label": y}) + "\n" for q, c, y in DOCS))
    (folder / "tiny_mc.yaml").write_text(
        f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(data))}
  cache_dir: {json.dumps(str(folder / "hf_cache"))}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{q}}}}"
doc_to_target: label
doc_to_choice: choices
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
    )


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    import lm_eval  # noqa: F401  (the dev extra installs it; a missing bridge must fail, not skip)

    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    write_task(folder)
    return str(folder)


@pytest.fixture(scope="module")
def model_and_tok():
    return tiny_model("llama"), word_tokenizer()


@pytest.fixture(scope="module")
def first_run(task_dir, model_and_tok):
    model, tok = model_and_tok
    return run_lm_eval(model, tok, TASK, include_path=task_dir, batch_size=4)


def choice_loglik(model, tok, context: str, choice: str) -> float:
    """Sum of log p(choice tokens | context), as lm_eval scores a ' choice' continuation."""
    n_ctx = len(tok(context, add_special_tokens=False)["input_ids"])
    ids = tok(context + " " + choice, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return sum(logp[i - 1, ids[i]].item() for i in range(n_ctx, len(ids)))


def test_metrics_are_clean_floats_in_range(first_run):
    assert set(first_run) == {TASK}
    metrics = first_run[TASK]
    assert {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"} <= set(metrics)
    assert all(isinstance(v, float) and "," not in k for k, v in metrics.items())
    assert 0.0 <= metrics["acc"] <= 1.0 and 0.0 <= metrics["acc_norm"] <= 1.0


def test_accuracy_matches_hand_computation(first_run, model_and_tok):
    model, tok = model_and_tok
    hits, norm_hits = [], []
    model.eval()
    for context, choices, label in DOCS:
        ll = [choice_loglik(model, tok, context, c) for c in choices]
        hits.append(max(range(len(ll)), key=ll.__getitem__) == label)
        # acc_norm divides by the choice's length in characters (lm_eval counts the choice text, no delimiter)
        norm = [x / len(c) for x, c in zip(ll, choices)]
        norm_hits.append(max(range(len(norm)), key=norm.__getitem__) == label)
    assert first_run[TASK]["acc"] == pytest.approx(sum(hits) / len(DOCS))
    assert first_run[TASK]["acc_norm"] == pytest.approx(sum(norm_hits) / len(DOCS))


def test_same_call_twice_is_identical_and_restores_train_mode(first_run, task_dir, model_and_tok):
    model, tok = model_and_tok
    model.train()
    again = run_lm_eval(model, tok, [TASK], include_path=task_dir, batch_size=4)
    assert again == first_run
    assert model.training  # HFLM calls model.eval(); the bridge puts the mode back


def test_peft_model_is_accepted(first_run, task_dir, model_and_tok):
    from peft import LoraConfig, get_peft_model

    _, tok = model_and_tok
    # the same seed-0 weights as the base model; a fresh LoRA adapter has B = 0, so it scores the same
    peft_model = get_peft_model(
        tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    )
    out = run_lm_eval(peft_model, tok, f" {TASK}, ", include_path=task_dir, batch_size=3)
    assert set(out) == {TASK}
    assert out[TASK]["acc"] == first_run[TASK]["acc"]
    assert out[TASK]["acc_norm"] == first_run[TASK]["acc_norm"]


def test_unknown_task_names_the_task_and_how_to_list(task_dir, model_and_tok):
    model, tok = model_and_tok
    with pytest.raises(ValueError, match="no_such_task_xyz") as err:
        run_lm_eval(model, tok, ["no_such_task_xyz"], include_path=task_dir)
    assert "lm-eval ls tasks" in str(err.value) and "include_path" in str(err.value)


@pytest.mark.parametrize("tasks", ["", " , ", []])
def test_empty_tasks_rejected(tasks):
    with pytest.raises(ValueError, match="no lm-eval tasks"):
        run_lm_eval(None, None, tasks)


def test_missing_lm_eval_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ImportError, match=r"pip install 'aletheia-lora\[lm-eval\]'"):
        run_lm_eval(None, None, "arc_easy")


def test_importing_the_bridge_does_not_import_lm_eval():
    code = "import sys, aletheia_lora.lm_eval_bridge; sys.exit('lm_eval' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_include_path_must_be_a_folder(tmp_path, model_and_tok):
    model, tok = model_and_tok
    with pytest.raises(FileNotFoundError, match="include_path"):
        run_lm_eval(model, tok, TASK, include_path=str(tmp_path / "missing"))


def test_metric_keys_cleaned_and_non_numbers_dropped():
    from aletheia_lora.lm_eval_bridge import _clean

    raw = {"t": {"alias": "t", "sample_len": 4, "acc,none": 0.5, "acc_stderr,none": "N/A", "em,strict": 1}}
    assert _clean(raw) == {"t": {"acc": 0.5, "em/strict": 1.0}}


def test_eval_cli_reports_lm_eval_tasks_as_suites(task_dir, tmp_path):
    from aletheia_lora.cli import main

    tiny_model("llama", num_layers=2).save_pretrained(tmp_path / "model")
    word_tokenizer().save_pretrained(tmp_path / "model")
    out = tmp_path / "eval"
    argv = ["eval", "--model", str(tmp_path / "model"), "--output_dir", str(out), "--suites", "general_text",
            "--text", str(Path(task_dir) / "tiny_mc.jsonl"), "--lm_eval_tasks", TASK, "--lm_eval_include",
            str(task_dir), "--quiet", "true"]  # fmt: skip
    assert main(argv) == 0
    suites = json.loads((out / "eval.json").read_text())["suites"]
    assert set(suites) == {"general_text", f"lm_eval:{TASK}"}
    assert 0.0 <= suites[f"lm_eval:{TASK}"]["acc"] <= 1.0
    assert f"lm_eval:{TASK} | acc |" in (out / "eval.md").read_text()
