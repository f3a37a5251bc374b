"""`aletheia-lora study` on a tiny 4-layer Llama with a word tokenizer and GSM8K-shaped files in tmp_path."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import statistics
from pathlib import Path

import pytest
from conftest import WORDS, qa_rows, tiny_model, word_tokenizer, write_jsonl

import aletheia_lora.study as study_module
from aletheia_lora import finetune
from aletheia_lora.cli import main
from aletheia_lora.costmodel import CostModel
from aletheia_lora.stats import blocked_difference, blocked_permutation_pvalue, matched_random, spearman
from aletheia_lora.study import (
    ARMS,
    StudyArguments,
    _answer_lines,
    answers,
    batch_order,
    controls_table,
    markdown_table,
    matched_comparison,
    run_study,
    seed_answers,
    study_figure,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("study")
    tiny_model("llama", num_layers=4).save_pretrained(root / "model")
    word_tokenizer().save_pretrained(root / "model")
    tiny_model("llama", num_layers=6).save_pretrained(root / "model6")
    word_tokenizer().save_pretrained(root / "model6")
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
        controls=0,
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
        "lora-all", "top", "random-1", "random-2", "last", "depth-aware", "lora-all-equal-time",
        *(f"lora-all-equal-time:{n}" for n in ("random-1", "random-2", "last", "depth-aware")),
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


def _timed(timing: dict, arm: dict) -> float:
    """The side-by-side step time of ``arm``'s layers and ranks."""
    config = [arm["selected_layers"], arm["attention_r"], arm["mlp_r"]]
    return timing["median_seconds"][next(k for k, v in timing["configs"].items() if v == config)]


def test_arms_are_timed_side_by_side_and_speedups_come_from_that(study):
    timing = study["timing"]
    trained = [a for a in study["arms"] if a["arm"] != "lora-all-equal-time"]
    # each distinct selection once, under the first arm that has it (arms with the same layers share it)
    configs = [[a["selected_layers"], a["attention_r"], a["mlp_r"]] for a in trained]
    assert list(timing["configs"].values()) == [c for i, c in enumerate(configs) if c not in configs[:i]]
    assert set(timing["configs"]) <= {a["arm"] for a in trained} and "lora-all" in timing["configs"]
    assert all(
        len(t) == timing["rounds"] * timing["steps_per_round"] == 2 for t in timing["step_seconds"].values()
    )
    med = timing["median_seconds"]
    for a in study["arms"]:
        assert a["measured_speedup"] == pytest.approx(med["lora-all"] / _timed(timing, a))


def test_equal_time_arm_gets_the_steps_that_fit_in_tops_wall_clock(study):
    arms, med = {a["arm"]: a for a in study["arms"]}, study["timing"]["median_seconds"]
    top = _timed(study["timing"], arms["top"])
    expected = math.floor((arms["top"]["probe_seconds"] + 3 * top) / med["lora-all"])
    assert arms["lora-all-equal-time"]["steps"] == max(1, min(expected, 2 * 3))


def test_metrics_deltas_and_answers(study):
    base = study["base"]
    assert set(base) == {"gsm8k_nll", "gsm8k_exact_match", "text_nll", "mmlu_accuracy", "mmlu_loglik"}
    for a in study["arms"]:
        assert a["delta"] == pytest.approx({k: a["metrics"][k] - base[k] for k in base})
    ref = next(a for a in study["arms"] if a["arm"] == "lora-all")
    assert ref["measured_speedup"] == 1.0 and ref["nll_vs_all"] == 0.0
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
    derived = {"measured_speedup", "delta", "nll_vs_all"}  # recomputed from the new timing

    def trained(arms):
        return [{k: v for k, v in a.items() if k not in derived} for a in json.loads(json.dumps(arms))]

    assert trained(again["arms"][:2]) == trained(first["arms"])  # kept as written, not re-run
    with pytest.raises(ValueError, match="other settings.*steps"):
        run_study(_args(ws, out, arms=["last"], steps=4, resume=True), log=lambda *a: None)
    # timing settings are not results: a resume may change them, and re-times when arms were added
    assert all(_timed(again["timing"], a) > 0 for a in again["arms"])
    assert set(again["timing"]["median_seconds"]) <= {"lora-all", "last", "random-1"}
    third = run_study(
        _args(ws, out, arms=["last", "random-1"], time_rounds=1, resume=True), log=lambda *a: None
    )
    assert third["timing"] == again["timing"]  # nothing new to time
    with pytest.raises(FileExistsError):
        run_study(_args(ws, out, arms=["last"]), log=lambda *a: None)


def test_bad_arguments_name_the_value(ws, tmp_path):
    with pytest.raises(ValueError, match="unknown arm 'nope'"):
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


# --------------------------------------------------------------------------- seeds and matched controls

SEEDS = [0, 1, 2]


def _seeded_args(ws: Path, out: Path, **kw) -> StudyArguments:
    """The 6-layer model (3-layer budget), cheap evaluation: a few seconds per run."""
    settings = dict(model=str(ws / "model6"), mmlu_dir=None, exact_match=0, text_windows=1, time_rounds=1)
    return _args(ws, out, **(settings | kw))


@pytest.fixture(scope="module")
def seeded(ws, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("seeded") / "study"
    args = _seeded_args(ws, out, arms=["top", "lora-all-equal-time"], seeds=SEEDS, controls=2)
    return run_study(args, log=lambda *a: None)


def _runs(record: dict, name: str) -> dict[int, dict]:
    return {a["seed"]: a for a in record["arms"] if a["arm"] == name}


def test_every_arm_runs_once_per_seed_and_the_report_gives_mean_sd_and_n(seeded):
    pairs = [(a["arm"], a["seed"]) for a in seeded["arms"]]
    assert sorted(pairs) == sorted((n, s) for n in ("lora-all", "top", "lora-all-equal-time") for s in SEEDS)
    # within a seed every run starts from the same model on the same first batch; the seeds' batches differ
    by_seed = {s: {round(a["first_loss"], 5) for a in seeded["arms"] if a["seed"] == s} for s in SEEDS}
    assert all(len(v) == 1 for v in by_seed.values()) and len(set().union(*by_seed.values())) > 1
    assert set(seeded["scores_by_seed"]) == {"0", "1", "2"} and seeded["seeds"] == SEEDS
    nll = seeded["across_seeds"]["top"]["gsm8k_nll"]
    values = [_runs(seeded, "top")[s]["metrics"]["gsm8k_nll"] for s in SEEDS]
    assert nll["values"] == {str(s): v for s, v in zip(SEEDS, values)} and nll["n"] == 3
    assert nll["mean"] == pytest.approx(statistics.fmean(values)) and nll["sd"] == pytest.approx(
        statistics.stdev(values)
    )
    md = (Path(seeded["output_dir"]) / "study.md").read_text()
    assert "## Across seeds" in md and "seeds 0, 1, 2 (evaluation items from seed 0)" in md
    row = next(line for line in md.splitlines() if line.startswith("| **top** | 3 |"))
    assert f"{nll['mean']:.4f}" in row and f"{nll['sd']:.4f}" in row and f"2: {values[2]:.4f}" in row
    assert "| **top** | 1 |" in md  # the run table has a seed column


def test_controls_are_cost_matched_seeded_and_recorded(seeded):
    tops = _runs(seeded, "top")
    assert all(tops[s]["selected_layers"] != [3, 4, 5] for s in SEEDS), (
        "top picked the last layers: no control"
    )
    controls = seeded["controls"]
    assert sorted((c["seed"], c["draw"]) for c in controls) == [(s, d) for s in SEEDS for d in (0, 1)]
    for c in controls:
        parent = tops[c["seed"]]
        assert c["arm"] == "top" and c["arm_layers"] == parent["selected_layers"]
        assert len(c["selected_layers"]) == len(parent["selected_layers"])
        assert min(c["selected_layers"]) == c["lowest_layer"] == min(parent["selected_layers"])
        assert c["selected_layers"] == matched_random(parent["selected_layers"], 6, c["draw"], c["seed"])
        assert c["steps"] == parent["steps"] == 3 and c["probe_seconds"] == 0.0
        assert (c["attention_r"], c["mlp_r"]) == (parent["attention_r"], parent["mlp_r"])
        if "same_as" in c:  # the same layers, ranks and seed trained before: its result, not a new run
            same = [x for x in seeded["arms"] + controls if x["seed"] == c["seed"] and x["arm"] == c["same_as"]["arm"]
                    and x.get("draw") == c["same_as"]["draw"] and "same_as" not in x]  # fmt: skip
            assert same[0]["selected_layers"] == c["selected_layers"] and same[0]["metrics"] == c["metrics"]
        else:  # LoRA B starts at zero: the first loss is the base model's on the seed's first batch
            assert c["first_loss"] == pytest.approx(parent["first_loss"], abs=1e-5)


def test_arm_against_its_controls_difference_se_and_permutation_p(seeded):
    m = seeded["answers"]["vs_matched_random"]["top"]
    tops = _runs(seeded, "top")
    groups = [
        ([tops[s]["metrics"]["gsm8k_nll"]], [c["metrics"]["gsm8k_nll"] for c in seeded["controls"] if c["seed"] == s])
        for s in SEEDS
    ]  # fmt: skip
    d, p = blocked_difference(groups), blocked_permutation_pvalue(groups)
    assert (m["difference"], m["se"], m["z"], m["p_value"]) == (
        d["difference"],
        d["se"],
        d["z"],
        p["p_value"],
    )
    assert m["exact"] and m["relabellings"] == 3**3 and m["seeds"] == 3 and m["no_alternative_seeds"] == []
    assert m["arm_nll"]["n"] == 3 and m["control_nll"]["n"] == 6
    assert m["by_seed"]["1"]["control_nll"] == groups[1][1]
    md = (Path(seeded["output_dir"]) / "study.md").read_text()
    assert "## Against cost-matched random controls" in md and "### Control runs" in md
    assert "`top` vs cost-matched random" in md and f"p = {m['p_value']:.4f}" in md


def test_equal_time_arm_and_top_against_all_layers_per_seed(seeded):
    timing = seeded["timing"]
    tops, alls, equal = (_runs(seeded, n) for n in ("top", "lora-all", "lora-all-equal-time"))
    for s in SEEDS:
        expected = math.floor(
            (tops[s]["probe_seconds"] + 3 * _timed(timing, tops[s])) / _timed(timing, alls[s])
        )
        assert equal[s]["steps"] == max(1, min(expected, 6))
    t = seeded["answers"]["top_vs_all"]
    nll = {
        n: {s: r[s]["metrics"]["gsm8k_nll"] for s in SEEDS}
        for n, r in (("top", tops), ("all", alls), ("eq", equal))
    }
    assert t["equal_steps"]["values"] == {
        str(s): pytest.approx(nll["top"][s] / nll["all"][s] - 1) for s in SEEDS
    }
    assert t["equal_time"]["values"] == {
        str(s): pytest.approx(nll["top"][s] / nll["eq"][s] - 1) for s in SEEDS
    }
    assert t["equal_time"]["n"] == 3 and t["equal_time_steps"] == {str(s): equal[s]["steps"] for s in SEEDS}


class Killed(Exception):
    """What a kill -9 leaves: the process stops between two runs, with study.json as last written."""


def _count_training(monkeypatch, stop_after: int | None = None) -> list[int]:
    """Count the real training runs study makes (``finetune.train_arm`` runs unchanged); with
    ``stop_after``, stop the study when it starts one more."""
    calls: list[int] = []

    def counted(*args, **kwargs):
        if stop_after is not None and len(calls) >= stop_after:
            raise Killed
        calls.append(1)
        return finetune.train_arm(*args, **kwargs)

    monkeypatch.setattr(study_module, "train_arm", counted)
    return calls


def _trained_fields(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if k not in {"measured_speedup", "delta", "nll_vs_all"}}


def test_resume_after_a_kill_keeps_finished_runs_bit_identical_and_reruns_none(ws, tmp_path, monkeypatch):
    out = tmp_path / "killed"
    args = dict(arms=["top"], seeds=[0, 1], controls=2)
    calls = _count_training(monkeypatch, stop_after=3)
    with pytest.raises(Killed):
        run_study(_seeded_args(ws, out, **args), log=lambda *a: None)
    killed = json.loads((out / "study.json").read_text())
    finished = killed["arms"] + killed["controls"]
    assert len(calls) == 3 == sum("same_as" not in e for e in finished)  # written after every run
    assert [(a["arm"], a["seed"]) for a in killed["arms"]] == [("lora-all", 0), ("top", 0)]  # seed 1: none

    calls = _count_training(monkeypatch)
    done = run_study(_seeded_args(ws, out, resume=True, **args), log=lambda *a: None)
    saved = json.loads((out / "study.json").read_text())
    for kind in ("arms", "controls"):
        assert [_trained_fields(e) for e in saved[kind][: len(killed[kind])]] == killed[kind]  # bit for bit
    everything = saved["arms"] + saved["controls"]
    assert len(calls) == sum("same_as" not in e for e in everything) - 3  # only what was missing
    assert sorted((c["seed"], c["draw"]) for c in saved["controls"]) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert done["answers"]["vs_matched_random"]["top"]["seeds"] == 2

    calls = _count_training(monkeypatch)  # all finished: a third run trains nothing and changes no run
    again = run_study(_seeded_args(ws, out, resume=True, **args), log=lambda *a: None)
    assert calls == [] and [_trained_fields(e) for e in again["arms"]] == [
        _trained_fields(e) for e in done["arms"]
    ]
    assert again["controls"] == done["controls"] and again["timing"] == done["timing"]
    # more seeds and controls later: only the new ones train
    calls = _count_training(monkeypatch)
    more = run_study(
        _seeded_args(ws, out, resume=True, arms=["top"], seeds=[0, 1], controls=3), log=lambda *a: None
    )
    assert len(calls) == sum("same_as" not in c for c in more["controls"] if c["draw"] == 2)
    assert more["controls"][:4] == done["controls"]


def test_a_record_from_before_seeds_resumes_with_more_seeds(ws, tmp_path, monkeypatch):
    out = tmp_path / "old"
    first = run_study(_seeded_args(ws, out, arms=["last"], controls=0), log=lambda *a: None)
    old = json.loads((out / "study.json").read_text())
    for key in ("controls", "seeds", "controls_per_seed", "scores_by_seed", "across_seeds"):
        old.pop(key)
    for a in old["arms"]:
        a.pop("seed")
    old["timing"].pop("configs")
    (out / "study.json").write_text(json.dumps(old))
    calls = _count_training(monkeypatch)
    again = run_study(_seeded_args(ws, out, arms=["last"], seeds=[0, 1], resume=True), log=lambda *a: None)
    assert len(calls) == 2  # lora-all and last for seed 1; seed 0 kept; `last` is not probe-driven
    assert [(a["arm"], a["seed"]) for a in again["arms"]] == [
        ("lora-all", 0),
        ("last", 0),
        ("lora-all", 1),
        ("last", 1),
    ]
    assert [_trained_fields(a) for a in again["arms"][:2]] == [_trained_fields(a) for a in first["arms"]]


def _entry(name, seed, nll, layers):
    return {
        "arm": name,
        "seed": seed,
        "metrics": {"gsm8k_nll": nll},
        "selected_layers": layers,
        "step_seconds": 1.0,
    }


def test_an_arm_with_no_matched_alternative_gets_no_verdict():
    record = {
        "settings": {"seed": 0},
        "num_layers": 4,
        "arms": [_entry("top", 0, 1.0, [2, 3]), _entry("depth-aware", 0, 1.1, [1, 3])],
        "controls": [_entry("depth-aware", 0, v, [1, 2]) | {"draw": d} for d, v in enumerate((1.2, 1.3))],
    }
    top = matched_comparison(record, "top")
    assert top["seeds"] == 0 and top["no_alternative_seeds"] == [0] and top["p_value"] is None
    da = matched_comparison(record, "depth-aware")
    assert da["p_value"] == pytest.approx(1 / 3) and da["difference"] == pytest.approx(0.15)
    lines = _answer_lines(seed_answers(record))
    assert any("every layer from its lowest up" in x for x in lines)
    assert any("`depth-aware` vs cost-matched random" in x and "p = 0.3333" in x for x in lines)
    table = controls_table(record)
    assert "| **top** | 0 (+1 without) | 2 | 2 |" in table and "| depth-aware | 1 | 1 | 2 |" in table


def test_seed_and_control_arguments(ws, tmp_path):
    assert _args(ws, tmp_path, seeds=[2, 0, 2, 1]).seeds == [2, 0, 1]
    assert _args(ws, tmp_path).run_seeds == [0] and _args(ws, tmp_path, seed=5).run_seeds == [5]
    with pytest.raises(ValueError, match="seeds"):
        _args(ws, tmp_path, seeds=[])
    with pytest.raises(ValueError, match="controls=-1"):
        _args(ws, tmp_path, controls=-1)
    # more seeds or controls add runs to a record; they do not make it another study
    assert not {"seeds", "controls"} & set(_args(ws, tmp_path, seeds=[0, 1]).fingerprint())
    assert StudyArguments.default_of("controls") == 3 and StudyArguments.default_of("seeds") is None


def test_probe_signals_are_recorded_per_seed_and_their_stability_reported(seeded):
    stability = seeded["answers"]["probe_stability"]
    assert set(stability) == {"grad-norm", "relative", "lora-energy", "coherence", "contribution"}
    signals = {s: seeded["scores_by_seed"][s]["lora-targets"]["signals"] for s in ("0", "1", "2")}
    for name, v in stability.items():
        assert set(v["pairs"]) == {"0-1", "0-2", "1-2"}
        a, b = signals["0"][name], signals["2"][name]
        layers = sorted(a, key=int)
        assert v["pairs"]["0-2"] == pytest.approx(spearman([a[k] for k in layers], [b[k] for k in layers]))
        assert v["mean"] == pytest.approx(statistics.fmean(v["pairs"].values()))
    # the arms rank by the study's --score (grad-norm by default): top's layers are its highest
    top = _runs(seeded, "top")[1]
    ranked = sorted(range(6), key=lambda i: (-signals["1"]["grad-norm"][str(i)], i))
    assert top["selected_layers"] == sorted(ranked[:3])
    md = (Path(seeded["output_dir"]) / "study.md").read_text()
    assert "## Probe signals across seeds" in md and "| **grad-norm** |" in md


def test_a_study_on_any_data_scores_held_out_nll_and_ranks_by_the_chosen_signal(ws, tmp_path):
    rng = random.Random(5)
    rows = [{"text": " ".join(rng.choice(WORDS) for _ in range(20))} for _ in range(120)]
    write_jsonl(tmp_path / "text.jsonl", rows)
    args = _seeded_args(
        ws, tmp_path / "study", gsm8k_dir=None, data=str(tmp_path / "text.jsonl"), arms=["top"],
        score="lora-energy", test_limit=5, text_windows=0,
    )  # fmt: skip
    record = run_study(args, log=lambda *a: None)
    assert set(record["base"]) >= {"task_nll"} and "gsm8k_nll" not in record["base"]
    assert record["data"]["name"] == str(tmp_path / "text.jsonl") and record["data"]["format"] == "text"
    assert record["data"]["test_rows"] == 5 and record["data"]["train_rows"] == 114  # 5% = 6 held out, 5 kept
    top = _runs(record, "top")[0]
    energy = record["scores_by_seed"]["0"]["lora-targets"]["signals"]["lora-energy"]
    assert top["selected_layers"] == sorted(sorted(range(6), key=lambda i: (-energy[str(i)], i))[:3])
    assert top["metrics"]["task_nll"] < record["base"]["task_nll"]  # it learned the held-out distribution
    md = (Path(record["output_dir"]) / "study.md").read_text()
    assert "held-out rows of" in md and "probe signal `lora-energy`" in md
    assert "text_nll" not in record["base"]  # no forgetting suite: no empty panel, the title says so
    assert (Path(record["output_dir"]) / "study.png").read_bytes().startswith(PNG_MAGIC)
    from matplotlib import pyplot

    fig = study_figure(record)
    assert len(fig.axes) == 1 and fig.texts[0].get_text().endswith("(no forgetting suite was run)")
    pyplot.close(fig)


def test_a_study_needs_exactly_one_task(ws, tmp_path):
    with pytest.raises(ValueError, match="exactly one task"):
        _args(ws, tmp_path, data=str(tmp_path / "x.jsonl"))
    with pytest.raises(ValueError, match="exactly one task"):
        _args(ws, tmp_path, gsm8k_dir=None)
    with pytest.raises(ValueError, match="exact_match=2 needs GSM8K"):
        _args(ws, tmp_path, gsm8k_dir=None, data="x.jsonl")
    with pytest.raises(ValueError, match="score='coherence' with probe_batches=1"):
        _args(ws, tmp_path, score="coherence", probe_batches=1)


def test_target_arms_pick_by_this_machines_cost_model_and_every_arm_gets_an_equal_time_twin(ws, tmp_path):
    """``depth-aware@1.2x`` selects with the cost model calibrated here (kept for resume), and
    ``lora-all-equal-time`` gives every selection arm, not only ``top``, an all-layer run of its wall-clock."""
    arms = ["top", "last", "depth-aware@1.2x", "lora-all-equal-time", "lora-all-equal-train-time"]
    args = _seeded_args(ws, tmp_path / "s", arms=arms, seeds=[0, 1], controls=1)
    record = run_study(args, log=lambda *a: None)
    cost = CostModel(**record["machine_cost"])
    assert cost.unit == "s" and record["machine_cost"]["meta"]["calibration"]
    for a in _runs(record, "depth-aware@1.2x").values():
        assert cost.speedup(a["selected_layers"]) >= 1.2 * (1 - 1e-9)
        assert a["machine_predicted_speedup"] == pytest.approx(cost.speedup(a["selected_layers"]))
        assert len(a["selected_layers"]) <= 3  # the 50% budget is a ceiling
    vs_all = record["answers"]["vs_all"]
    assert set(vs_all) == {"top", "last", "depth-aware@1.2x"}
    for name in vs_all:
        arms, alls = _runs(record, name), _runs(record, "lora-all")
        for kind, key, probed in (("lora-all-equal-time", "equal_time", True),
                                  ("lora-all-equal-train-time", "equal_train_time", False)):  # fmt: skip
            twins = _runs(
                record, kind if (name, kind) == ("top", "lora-all-equal-time") else f"{kind}:{name}"
            )
            for s in (0, 1):
                timing = record["timing"]
                wall = arms[s]["probe_seconds"] * probed + 3 * _timed(timing, arms[s])
                assert twins[s]["steps"] == max(1, min(math.floor(wall / _timed(timing, alls[s])), 6))
                assert twins[s]["time_of"] == name and twins[s]["selected_layers"] == list(range(6))
                expected = arms[s]["metrics"]["gsm8k_nll"] / twins[s]["metrics"]["gsm8k_nll"] - 1
                assert vs_all[name][key]["values"][str(s)] == pytest.approx(expected)
                assert vs_all[name][f"{key}_steps"][str(s)] == twins[s]["steps"]
    assert (
        "Against all-layer LoRA: equal steps and equal wall-clock"
        in Path(record["output_dir"], "study.md").read_text()
    )
    # resume with the calibration kept: nothing is trained or calibrated again, the same picks
    again = run_study(dataclasses.replace(args, resume=True), log=lambda *a: None)
    assert again["machine_cost"] == record["machine_cost"]
    assert [a["selected_layers"] for a in again["arms"]] == [a["selected_layers"] for a in record["arms"]]


def test_arm_names_are_checked_before_loading_a_model(ws, tmp_path):
    with pytest.raises(ValueError, match=r"unknown arm 'depth-aware@fastx'.*depth-aware@1.5x"):
        _args(ws, tmp_path / "x", arms=["depth-aware@fastx"])
    with pytest.raises(ValueError, match="ask for lora-all-equal-time instead"):
        _args(ws, tmp_path / "x", arms=["lora-all-equal-time:last"])
    with pytest.raises(ValueError, match=r"depth-aware@40x is out of reach.*lower target"):
        run_study(_seeded_args(ws, tmp_path / "y", arms=["depth-aware@40x"]), log=lambda *a: None)


def test_the_plot_shows_equal_time_twins_in_their_own_panel(ws, tmp_path):
    """With twins, study.png gets a middle panel of each arm against all-layer LoRA, and the twins do not
    crowd the speedup panel (three axes, not two; the twins' names only on the middle one)."""
    from matplotlib import pyplot

    record = run_study(_seeded_args(ws, tmp_path / "p", arms=["top", "lora-all-equal-train-time"], seeds=[0]),
                       log=lambda *a: None)  # fmt: skip
    fig = study_figure(record)
    left, middle, right = fig.axes[:3]
    assert not any("equal" in t.get_text() for t in left.texts)
    assert [t.get_text() for t in middle.get_yticklabels()] == ["top"]
    assert {t.get_text() for t in middle.get_legend().get_texts()} >= {"equal steps", "equal training time"}
    pyplot.close(fig)
