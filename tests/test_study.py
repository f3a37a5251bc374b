"""`aletheia-lora study` on a tiny 4-layer Llama with a word tokenizer and GSM8K-shaped files in tmp_path."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
from conftest import WORDS, qa_rows, tiny_model, word_tokenizer, write_jsonl

from aletheia_lora.cli import main
from aletheia_lora.study import (
    ARMS,
    StudyArguments,
    _answer_lines,
    answers,
    batch_order,
    markdown_table,
    run_study,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("study")
    tiny_model("llama", num_layers=4).save_pretrained(root / "model")
    word_tokenizer().save_pretrained(root / "model")
    (root / "gsm8k").mkdir()
    write_jsonl(root / "gsm8k" / "train.jsonl", qa_rows(30, seed=0))
    write_jsonl(root / "gsm8k" / "test.jsonl", qa_rows(6, seed=1))
    (root / "mmlu").mkdir()
    (root / "mmlu" / "tiny_test.csv").write_text(
        "the cat sat on what ?,mat,dog,red,one,A\na dog ran ?,cat,big,mat,two,C\n"
    )
    (root / "text.txt").write_text(" ".join(random.Random(2).choice(WORDS) for _ in range(120)))
    return root


def _args(ws: Path, out: Path, **kw) -> StudyArguments:
    settings = dict(
        gsm8k_dir=str(ws / "gsm8k"), output_dir=str(out), model=str(ws / "model"), mmlu_dir=str(ws / "mmlu"),
        text=str(ws / "text.txt"), steps=3, batch_size=2, time_rounds=2, time_steps=1, max_length=32, probe_batches=2, test_limit=4,
        exact_match=2, max_new_tokens=3, text_windows=2, humaneval_limit=0, eval_max_length=32, quiet=True,
    )  # fmt: skip
    return StudyArguments(**(settings | kw))


@pytest.fixture(scope="module")
def study(ws, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("run") / "study"
    arms = ["top", "random-1", "random-2", "last", "depth-aware", "lora-all-equal-time"]
    return run_study(_args(ws, out, arms=arms), log=lambda *a: None)


def test_writes_json_markdown_and_plot(study):
    out = Path(study["output_dir"])
    assert sorted(p.name for p in out.iterdir()) == ["study.json", "study.md", "study.png"]
    assert (out / "study.png").read_bytes().startswith(PNG_MAGIC)
    saved = json.loads((out / "study.json").read_text())
    assert [a["arm"] for a in saved["arms"]] == [
        "lora-all", "top", "random-1", "random-2", "last", "depth-aware", "lora-all-equal-time"
    ]  # fmt: skip
    md = (out / "study.md").read_text()
    assert "| **top** |" in md and "## Answers" in md and "lora-all-equal-time" in md


def test_every_arm_sees_the_same_batches_and_starts_from_the_same_model(study):
    # LoRA's B starts at zero, so step 0's loss is the base model's on the same batch: equal for all arms
    first = [a["first_loss"] for a in study["arms"]]
    assert max(first) - min(first) < 1e-5
    assert all(math.isfinite(a["final_loss"]) and len(a["losses"]) == a["steps"] for a in study["arms"])


def test_selections_have_the_budget_and_the_named_shape(study):
    arms = {a["arm"]: a for a in study["arms"]}
    assert arms["lora-all"]["selected_layers"] == [0, 1, 2, 3]
    for name in ("top", "random-1", "random-2", "last", "depth-aware"):
        assert len(arms[name]["selected_layers"]) == 2, name
    assert arms["last"]["selected_layers"] == [2, 3]
    scores = {int(k): v for k, v in study["scores"]["lora-targets"]["scores"].items()}
    assert arms["top"]["selected_layers"] == sorted(sorted(scores, key=scores.get)[-2:])
    assert arms["top"]["trainable_params"] == arms["lora-all"]["trainable_params"] // 2
    assert arms["top"]["probe_seconds"] > 0
    assert arms["random-1"]["probe_seconds"] == 0 == arms["last"]["probe_seconds"]
    assert arms["random-1"]["selected_layers"] != arms["random-2"]["selected_layers"]


def test_arms_are_timed_side_by_side_and_speedups_come_from_that(study):
    timing = study["timing"]
    trained = [a["arm"] for a in study["arms"] if a["arm"] != "lora-all-equal-time"]
    assert list(timing["step_seconds"]) == trained
    assert all(
        len(t) == timing["rounds"] * timing["steps_per_round"] == 2 for t in timing["step_seconds"].values()
    )
    med = timing["median_seconds"]
    for a in study["arms"]:
        own = med["lora-all" if a["arm"] == "lora-all-equal-time" else a["arm"]]
        assert a["measured_speedup"] == pytest.approx(med["lora-all"] / own)


def test_equal_time_arm_gets_the_steps_that_fit_in_tops_wall_clock(study):
    arms, med = {a["arm"]: a for a in study["arms"]}, study["timing"]["median_seconds"]
    expected = math.floor((arms["top"]["probe_seconds"] + 3 * med["top"]) / med["lora-all"])
    assert arms["lora-all-equal-time"]["steps"] == max(1, min(expected, 2 * 3))


def test_metrics_deltas_and_answers(study):
    base = study["base"]
    assert set(base) == {"gsm8k_nll", "gsm8k_exact_match", "text_nll", "mmlu_accuracy", "mmlu_loglik"}
    for a in study["arms"]:
        assert a["delta"] == pytest.approx({k: a["metrics"][k] - base[k] for k in base})
    ref = next(a for a in study["arms"] if a["arm"] == "lora-all")
    assert ref["measured_speedup"] == 1.0 and ref["gsm8k_nll_vs_all"] == 0.0
    ans = study["answers"]
    assert ans["top_vs_random"]["random_min"] <= ans["top_vs_random"]["random_mean"]
    assert set(ans["targets"]["top"]) == {
        "vs_all",
        "within_3pct_of_all",
        "no_worse_than_random_mean",
        "worse_than_all_on",
        "worse_than_base_on",
    }


def _arm(name, nll, text=0.0, layers=(0,)):
    return {"arm": name, "metrics": {"gsm8k_nll": nll}, "delta": {"text_nll": text}, "selected_layers": list(layers),
            "steps": 10, "measured_speedup": 1.0}  # fmt: skip


def test_answers_from_numbers():
    arms = {
        "lora-all": _arm("lora-all", 1.00, text=0.02),
        "top": _arm("top", 1.02, text=0.01),
        "random-1": _arm("random-1", 1.05),
        "random-2": _arm("random-2", 1.01),
    }
    ans = answers(arms)
    assert ans["top_vs_random"]["beats_mean"] and not ans["top_vs_random"]["beats_every_seed"]
    assert ans["top_vs_all_equal_steps"] == pytest.approx(0.02)
    t = ans["targets"]["top"]
    assert t["within_3pct_of_all"] and t["worse_than_all_on"] == {} and t["no_worse_than_random_mean"]
    assert t["worse_than_base_on"] == {"text_nll": 0.01}  # text NLL went up: forgetting
    arms["top"] = _arm("top", 1.04, text=0.03)
    t = answers(arms)["targets"]["top"]
    assert not t["within_3pct_of_all"] and not t["no_worse_than_random_mean"]
    assert t["worse_than_all_on"] == {"text_nll": pytest.approx(0.01)}
    arms["top"] = _arm("top", 1.02, text=-0.01)  # text NLL went down: nothing forgotten
    assert answers(arms)["targets"]["top"]["worse_than_base_on"] == {}
    arms["top-asym"] = _arm("top-asym", 0.98) | {"mlp_r": 64}
    arms["lora-all-asym"] = _arm("lora-all-asym", 0.96) | {"mlp_r": 64}
    ans = answers(arms)
    assert ans["asymmetric_ranks"]["vs_top"] == pytest.approx(0.98 / 1.02 - 1)
    assert ans["targets"]["top-asym"]["vs_all"] == pytest.approx(-0.02)
    assert ans["targets"]["top-asym"]["vs_all_same_ranks"] == pytest.approx(0.98 / 0.96 - 1)
    assert "depth_aware_asym" not in ans
    arms["depth-aware-asym"] = _arm("depth-aware-asym", 0.99, layers=(2, 3)) | {
        "mlp_r": 64,
        "measured_speedup": 1.3,
    }
    d = answers(arms)["depth_aware_asym"]
    assert d["nll_vs_top_asym"] == pytest.approx(0.99 / 0.98 - 1) and d["vs_all"] == pytest.approx(-0.01)
    assert (d["speedup"], d["top_asym_speedup"], d["layers"]) == (1.3, 1.0, [2, 3])
    line = next(x for x in _answer_lines(answers(arms)) if "Depth-aware at the default ranks" in x)
    assert "+1.0% vs `top-asym`" in line and "1.30x against `top-asym`'s 1.00x" in line


def test_resume_keeps_finished_arms_and_refuses_other_settings(ws, tmp_path):
    out = tmp_path / "s"
    first = run_study(_args(ws, out, arms=["last"]), log=lambda *a: None)
    again = run_study(_args(ws, out, arms=["last", "random-1"], resume=True), log=lambda *a: None)
    assert [a["arm"] for a in again["arms"]] == ["lora-all", "last", "random-1"]
    derived = {"measured_speedup", "delta", "gsm8k_nll_vs_all"}  # recomputed from the new timing

    def trained(arms):
        return [{k: v for k, v in a.items() if k not in derived} for a in json.loads(json.dumps(arms))]

    assert trained(again["arms"][:2]) == trained(first["arms"])  # kept as written, not re-run
    with pytest.raises(ValueError, match="other settings.*steps"):
        run_study(_args(ws, out, arms=["last"], steps=4, resume=True), log=lambda *a: None)
    # timing settings are not results: a resume may change them, and re-times when arms were added
    assert set(again["timing"]["median_seconds"]) == {"lora-all", "last", "random-1"}
    third = run_study(
        _args(ws, out, arms=["last", "random-1"], time_rounds=1, resume=True), log=lambda *a: None
    )
    assert third["timing"] == again["timing"]  # nothing new to time
    with pytest.raises(FileExistsError):
        run_study(_args(ws, out, arms=["last"]), log=lambda *a: None)


def test_bad_arguments_name_the_value(ws, tmp_path):
    with pytest.raises(ValueError, match="unknown arms \\['nope'\\]"):
        _args(ws, tmp_path, arms=["nope"])
    with pytest.raises(FileNotFoundError, match="train.jsonl"):
        _args(ws, tmp_path, gsm8k_dir=str(tmp_path))
    with pytest.raises(ValueError, match="steps=0"):
        _args(ws, tmp_path, steps=0)
    assert _args(ws, tmp_path, arms=["lora-all-equal-time"]).arms == [
        "lora-all",
        "top",
        "lora-all-equal-time",
    ]
    assert list(ARMS)[:2] == ["lora-all", "top"]


def test_batch_order_is_seeded_and_prefix_stable():
    long, short = batch_order(7, 10, 3, seed=5), batch_order(7, 4, 3, seed=5)
    assert long[:4] == short and all(len(b) == 3 for b in long)
    flat = [i for b in long for i in b]
    assert sorted(flat[:7]) == list(range(7)) and flat[7:14] == flat[:7]  # a permutation, cycled
    assert batch_order(7, 4, 3, seed=6) != short


def test_cli_prints_the_table(ws, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["study", "--gsm8k_dir", str(ws / "gsm8k"), "--output_dir", str(out), "--model", str(ws / "model"),
            "--arms", "last", "--steps", "2", "--batch_size", "2", "--max_length", "32", "--test_limit", "3",
            "--text", str(ws / "text.txt"), "--text_windows", "1", "--humaneval_limit", "0",
            "--eval_max_length", "32", "--quiet", "true"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.strip() == markdown_table(json.loads((out / "study.json").read_text())).strip()
