"""`aletheia-lora oracle` on a tiny 3-layer Llama with a word tokenizer and GSM8K-shaped files in tmp_path."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import qa_rows, tiny_model, word_tokenizer, write_jsonl

from aletheia_lora.cli import main
from aletheia_lora.oracle import FILES, OracleArguments, resolve_combos, run_oracle
from aletheia_lora.stats import spearman

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("oracle")
    tiny_model("llama", num_layers=3).save_pretrained(root / "model")
    word_tokenizer().save_pretrained(root / "model")
    (root / "gsm8k").mkdir()
    write_jsonl(root / "gsm8k" / "train.jsonl", qa_rows(24, seed=0))
    write_jsonl(root / "gsm8k" / "test.jsonl", qa_rows(6, seed=1))
    return root


def _args(ws: Path, out: Path, **kw) -> OracleArguments:
    settings = dict(
        model=str(ws / "model"), data=str(ws / "gsm8k"), output_dir=str(out), steps=3, batch_size=2,
        max_length=32, probe_batches=2, r=4, lora_alpha=8, quiet=True,
    )  # fmt: skip
    return OracleArguments(**(settings | kw))


@pytest.fixture(scope="module")
def oracle(ws, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("run") / "oracle"
    return run_oracle(
        _args(ws, out, combos=["top2", "every-other", "0,1,2"], probe_seeds=[1]),
        command=["aletheia-lora", "oracle"],
    )


def test_writes_json_markdown_and_plot(oracle):
    out = Path(oracle["output_dir"])
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    assert (out / "oracle.png").read_bytes().startswith(PNG_MAGIC)
    saved = json.loads((out / "oracle.json").read_text())
    assert list(saved["layers"]) == ["0", "1", "2"]
    md = (out / "oracle.md").read_text()
    for heading in ("## Per layer (3 of 3)", "## Does a probe signal track U?", "## Does utility add up?"):
        assert heading in md
    assert "aletheia-lora oracle" in md and "| grad-norm |" in md
    assert saved["cpu_seconds"] > 0 and saved["wall_seconds"] > 0 and saved["versions"]["torch"]


def test_one_utility_per_layer_from_the_same_batches_and_the_same_start(oracle):
    layers = oracle["layers"]
    for i, r in layers.items():
        assert r["layers"] == [int(i)] == [r["lowest_trained_layer"]]
        assert r["utility"] == pytest.approx(oracle["base_loss"] - r["eval_loss"])
        assert math.isfinite(r["utility"]) and r["steps"] == 3 == len(r["losses"]) == len(r["step_times"])
        assert r["cpu_seconds"] > 0 and r["wall_seconds"] >= r["train_seconds"]
    # one data order for every layer; LoRA's B starts at zero, so step 0's loss is the base model's on it
    assert len({r["order_digest"] for r in layers.values()}) == 1
    first = [r["first_loss"] for r in layers.values()]
    assert max(first) - min(first) < 1e-6
    assert len(oracle["batch_order"]) == 3 and all(len(b) == 2 for b in oracle["batch_order"])


def test_probe_signals_are_ranked_against_utility(oracle):
    corr = oracle["analysis"]["correlation"]
    assert {"grad-norm", "depth (reference)"} <= set(corr)
    assert set(oracle["probe"]["signals"]) <= set(corr)
    for c in corr.values():
        assert c["n"] == 3 and (math.isnan(c["spearman"]) or -1 <= c["spearman"] <= 1)
    assert "Spearman" in oracle["table"] and "random (expected)" in oracle["table"]


def test_additivity_entries(oracle):
    utility = {int(k): v["utility"] for k, v in oracle["layers"].items()}
    top2 = sorted(sorted(utility, key=lambda i: (-utility[i], i))[:2])
    assert [c["layers"] for c in oracle["combos"]] == [top2, [0, 2], [0, 1, 2]][: len(oracle["combos"])]
    assert len(oracle["combos"]) == 3 - (top2 == [0, 2])  # a repeat of an earlier selection is skipped
    for entry, combo in zip(oracle["analysis"]["additivity"], oracle["combos"]):
        assert entry["layers"] == combo["layers"] and entry["joint"] == combo["utility"]
        assert entry["sum_of_singles"] == pytest.approx(sum(utility[i] for i in combo["layers"]))
        assert combo["lowest_trained_layer"] == min(combo["layers"])


def test_resume_keeps_finished_layers_bit_identical_and_reruns_nothing(ws, tmp_path):
    out = tmp_path / "o"
    first = run_oracle(_args(ws, out, layers=[0], combos=["none"]))
    assert list(first["layers"]) == ["0"] and first["combos"] == []
    saved = json.loads((out / "oracle.json").read_text())
    with pytest.raises(FileExistsError):
        run_oracle(_args(ws, out, combos=["none"]))
    with pytest.raises(ValueError, match="steps"):
        run_oracle(_args(ws, out, steps=4, resume=True, combos=["none"]))
    full = run_oracle(_args(ws, out, resume=True, combos=["top2"]))
    again = json.loads((out / "oracle.json").read_text())
    assert again["layers"]["0"] == saved["layers"]["0"]  # kept as written, bit for bit
    assert again["base_loss"] == saved["base_loss"] and again["probe"] == saved["probe"]
    assert [s["trained"] for s in again["sessions"]] == [[0], [1, 2, full["combos"][0]["layers"]]]
    done = run_oracle(_args(ws, out, resume=True, combos=["top2"]))
    assert done["sessions"][-1]["trained"] == [] and done["layers"] == again["layers"]
    assert done["wall_seconds"] == pytest.approx(sum(s["wall_seconds"] for s in done["sessions"]))


def test_combos_resolve_by_utility_and_by_depth():
    utility = {0: 0.1, 1: 0.5, 2: 0.3, 3: -0.1}
    specs = ["top3", "top-half", "lower-half", "every-other", "1,3", "none", "top1", "2,1"]
    assert resolve_combos(specs, utility) == [
        ("top3", [0, 1, 2]), ("top-half", [1, 2]), ("lower-half", [0, 1]), ("every-other", [0, 2]),
        ("1,3", [1, 3]),
    ]  # fmt: skip
    with pytest.raises(ValueError, match="no U yet"):
        resolve_combos(["1,7"], utility)


def test_bad_arguments_name_the_value(ws, tmp_path):
    with pytest.raises(ValueError, match="output_dir"):
        OracleArguments()
    with pytest.raises(ValueError, match="combos"):
        _args(ws, tmp_path, combos=["top", "first-half"])
    with pytest.raises(ValueError, match="layers"):
        _args(ws, tmp_path, layers=[-1])
    with pytest.raises(ValueError, match="3 blocks"):
        run_oracle(_args(ws, tmp_path / "x", layers=[5]))


def test_cli_prints_the_correlation_table(ws, tmp_path, capsys):
    argv = ["oracle", "--model", str(ws / "model"), "--data", str(ws / "gsm8k"), "--output_dir",
            str(tmp_path / "cli"), "--layers", "1", "2", "--combos", "none", "--steps", "2", "--batch_size", "2",
            "--max_length", "32", "--probe_batches", "2", "--r", "4", "--quiet", "true"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "Spearman" in printed and "grad-norm" in printed
    saved = json.loads((tmp_path / "cli" / "oracle.json").read_text())
    assert list(saved["layers"]) == ["1", "2"]
    assert saved["sessions"][0]["command"][:2] == ["aletheia-lora", "oracle"]


def test_every_signal_against_utility_under_each_probe_seed(oracle):
    assert set(oracle["probe"]["signals"]) == {
        "grad-norm",
        "relative",
        "lora-energy",
        "coherence",
        "contribution",
    }
    across = oracle["analysis"]["across_probe_seeds"]
    assert set(across) == set(oracle["probe"]["signals"])
    utility = [oracle["layers"][str(i)]["utility"] for i in range(3)]
    other = oracle["probes_by_seed"]["1"]["signals"]
    for name, v in across.items():
        assert set(v["spearman"]) == {"0", "1"}
        assert v["spearman"]["1"] == pytest.approx(spearman([other[name][str(i)] for i in range(3)], utility),
                                                   nan_ok=True)  # fmt: skip
        assert v["spearman"]["0"] == pytest.approx(
            oracle["analysis"]["correlation"][name]["spearman"], nan_ok=True
        )
    assert other["grad-norm"] != oracle["probe"]["signals"]["grad-norm"]  # other batches
    assert "### Across probe seeds" in (Path(oracle["output_dir"]) / "oracle.md").read_text()


def test_resume_probes_again_when_the_record_lacks_a_signal(ws, tmp_path):
    out = tmp_path / "o"
    run_oracle(_args(ws, out, layers=[0, 1], combos=["none"]))
    saved = json.loads((out / "oracle.json").read_text())
    del saved["probe"]["signals"]["contribution"]  # as written before the signal existed
    (out / "oracle.json").write_text(json.dumps(saved))
    again = run_oracle(_args(ws, out, layers=[0, 1], combos=["none"], resume=True))
    assert "contribution" in again["probe"]["signals"] and again["layers"] == saved["layers"]
    assert again["sessions"][-1]["trained"] == []
