"""Time-to-target: the interpolation on synthetic curves, and `aletheia-lora race` end to end on a tiny Llama."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import qa_rows, tiny_model, word_tokenizer, write_jsonl

from aletheia_lora.race import RaceArguments, race_arm, run_race
from aletheia_lora.time_to_target import common_grid, crossing_time, seed_times, summarize_arm, targets

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- the arithmetic


def test_crossing_time_interpolates_linearly_between_evaluations():
    seconds, losses = [0.0, 10.0, 20.0, 30.0], [2.0, 1.5, 1.0, 0.9]
    assert crossing_time(seconds, losses, 1.25) == pytest.approx(15.0)
    assert crossing_time(seconds, losses, 1.0) == pytest.approx(20.0)  # exactly at an evaluation
    assert crossing_time(seconds, losses, 2.5) == 0.0  # already there before training
    assert crossing_time(seconds, losses, 0.5) is None  # never
    # the first crossing counts, even if the curve comes back up later
    assert crossing_time([0, 1, 2, 3], [2.0, 1.0, 1.4, 0.8], 1.2) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="3 times but 2 losses"):
        crossing_time([0, 1, 2], [1.0, 0.5], 0.7)


def test_targets_are_the_reference_final_loss_and_shares_of_its_improvement():
    got = targets([3.0, 2.0, 1.2, 1.0])
    assert got == {"final": 1.0, "95%": pytest.approx(1.1), "90%": pytest.approx(1.2)}


def test_an_arm_twice_as_fast_on_the_same_curve_has_speedup_two():
    losses = [3.0, 2.0, 1.5, 1.2, 1.0]
    curves = {
        "lora-all": {"train_seconds": [0, 10, 20, 30, 40], "heldout_loss": losses},
        "fast": {"train_seconds": [0, 5, 10, 15, 20], "heldout_loss": losses},
        "never": {"train_seconds": [0, 5, 10, 15, 20], "heldout_loss": [3.0, 2.5, 2.2, 2.1, 2.05]},
    }
    times = seed_times(curves, "lora-all")
    assert times["lora-all"]["speedup"] == {"final": 1.0, "95%": 1.0, "90%": 1.0}
    assert times["fast"]["speedup"] == pytest.approx({"final": 2.0, "95%": 2.0, "90%": 2.0})
    assert times["never"]["time"]["final"] is None
    assert times["never"]["speedup_bound"]["final"] == pytest.approx(40 / 20)  # ran out of run at 20 s


def test_summaries_say_how_many_seeds_reached_and_whether_faster_beyond_two_standard_errors():
    def seed(speedup, bound=None):
        return {"speedup": {"final": speedup}, "speedup_bound": {"final": bound}}

    faster = summarize_arm([seed(1.5), seed(1.6), seed(1.55)], "final")
    assert faster["mean"] == pytest.approx(1.55) and faster["faster"] is True and faster["reached"] == 3
    noisy = summarize_arm([seed(0.8), seed(1.6), seed(1.2)], "final")
    assert noisy["faster"] is False  # mean 1.2 but the seeds disagree
    partial = summarize_arm([seed(1.5), seed(None, 0.9), seed(1.4)], "final")
    assert partial["reached"] == 2 and "mean" not in partial and partial["bound"] == 0.9


def test_common_grid_shades_seeds_around_their_mean():
    grid = common_grid([([0, 10], [2.0, 1.0]), ([0, 5, 20], [2.0, 1.0, 0.5])], points=3)
    assert grid["seconds"] == [0, 5, 10]  # up to the shorter run
    assert grid["mean"] == pytest.approx([2.0, 1.25, 0.9166667])
    assert grid["low"] == pytest.approx([2.0, 1.0, 0.8333333]) and grid["high"] == pytest.approx(
        [2.0, 1.5, 1.0]
    )


def test_arm_names_and_bad_ones():
    assert race_arm("drop@1.3x").schedule == "drop" and race_arm("drop@1.3x").target == 1.3
    assert race_arm("depth-aware@1.5x").strategy == "depth-aware" and race_arm("depth-aware@1.5x").probed
    assert not race_arm("freeze").probed and race_arm("top").probed
    assert race_arm("freeze@0.6").threshold == 0.6 and race_arm("freeze@0.6").schedule == "freeze"
    for bad in ("drop@1x", "drop", "random", "freeze@0", "freeze@x"):
        with pytest.raises(ValueError, match=f"arm {bad!r} is unknown"):
            race_arm(bad)


# --------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("race")
    tiny_model("llama", num_layers=6).save_pretrained(root / "model")
    word_tokenizer().save_pretrained(root / "model")
    (root / "gsm8k").mkdir()
    write_jsonl(root / "gsm8k" / "train.jsonl", qa_rows(30, seed=0))
    write_jsonl(root / "gsm8k" / "test.jsonl", qa_rows(6, seed=1))
    return root


def _args(ws: Path, out: Path, **kw) -> RaceArguments:
    settings = dict(
        gsm8k_dir=str(ws / "gsm8k"), output_dir=str(out), model=str(ws / "model"), steps=8, eval_every=4,
        batch_size=2, max_length=32, probe_batches=2, test_limit=4, freeze_interval=2, freeze_min_steps=2,
        freeze_threshold=0.5, quiet=True,
    )  # fmt: skip
    return RaceArguments(**(settings | kw))


@pytest.fixture(scope="module")
def race(ws, tmp_path_factory) -> dict:
    return run_race(_args(ws, tmp_path_factory.mktemp("run") / "race", seeds=[0]), log=lambda *a: None)


def test_race_writes_every_raw_list_a_reader_needs(race):
    out = Path(race["output_dir"])
    assert sorted(p.name for p in out.iterdir()) == ["race.md", "race.png", "summary.json"]
    assert (out / "race.png").read_bytes().startswith(PNG_MAGIC)
    saved = json.loads((out / "summary.json").read_text())
    arms = {r["arm"] for r in saved["runs"]}
    assert arms == {"lora-all", "top", "depth-aware@1.3x", "freeze", "drop@1.3x"}
    for run in saved["runs"]:
        assert run["steps"] == [0, 4, 8]
        assert len(run["train_seconds"]) == len(run["heldout_loss"]) == len(run["h200_units"]) == 3
        assert run["train_seconds"][0] == 0 and run["train_seconds"] == sorted(run["train_seconds"])
        assert len(run["step_seconds"]) == len(run["lowest_block"]) == len(run["dropped_blocks"]) == 8
        assert math.isclose(sum(run["step_seconds"][:4]), run["train_seconds"][1])
        assert (run["probe_seconds"] > 0) == race_arm(run["arm"]).probed
    assert (
        "lora-all" in (out / "race.md").read_text()
        and "Projected to an H200" in (out / "race.md").read_text()
    )


def test_every_arm_starts_from_the_same_model_and_sees_the_same_batches(race):
    runs = race["runs"]
    assert len({r["heldout_loss"][0] for r in runs}) == 1  # LoRA starts as the identity
    assert len({round(r["train_losses"][0], 6) for r in runs}) == 1  # the same first batch, the same model
    by_arm = {r["arm"]: r for r in runs}
    assert by_arm["drop@1.3x"]["schedule"]["kind"] == "drop"
    assert any(by_arm["drop@1.3x"]["dropped_blocks"])  # rates near 0.3 drop something in 8 steps
    assert by_arm["freeze"]["schedule"]["history"], "the freeze schedule decided at least once"


def test_resume_keeps_finished_seeds_and_adds_new_ones(ws, race):
    out = Path(race["output_dir"])
    before = json.loads((out / "summary.json").read_text())["runs"]
    again = run_race(_args(ws, out, seeds=[0, 1], resume=True), log=lambda *a: None)
    kept = [r for r in again["runs"] if r["seed"] == 0]
    assert [r["heldout_loss"] for r in kept] == [r["heldout_loss"] for r in before]
    assert {r["seed"] for r in again["runs"]} == {0, 1}
    assert set(again["analysis"]["per_seed"]["wall"]) == {"0", "1"}
    with pytest.raises(ValueError, match="steps"):
        run_race(_args(ws, out, seeds=[0], steps=6, resume=True), log=lambda *a: None)


def test_bad_settings_are_refused_before_any_model_loads(ws, tmp_path):
    with pytest.raises(ValueError, match="give exactly one task"):
        RaceArguments(output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="freeze_max_frozen=1"):
        _args(ws, tmp_path, freeze_max_frozen=1)
    with pytest.raises(ValueError, match="arm 'drop@0.5x' is unknown"):
        _args(ws, tmp_path, arms=["drop@0.5x"])
    with pytest.raises(FileExistsError, match="not empty"):
        (tmp_path / "x").write_text("mine")
        run_race(_args(ws, tmp_path), log=lambda *a: None)
    assert (tmp_path / "x").read_text() == "mine"
