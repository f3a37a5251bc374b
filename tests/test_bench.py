"""`aletheia-lora bench` and the presets: what the bench writes and restores, never how fast it is."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as T
from conftest import tiny_model

from aletheia_lora.architecture import find_blocks
from aletheia_lora.bench import ARMS, BASELINE, BenchArguments, probe_config, run_bench
from aletheia_lora.cli import main
from aletheia_lora.presets import PRESETS, preset_config, preset_names
from aletheia_lora.selection import budget
from aletheia_lora.timing import CALIBRATION, TimedArm, arm_model, optimizer_step

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = dict(random_init="smollm2-135m", num_layers=4, seq_len=16, batch_size=2, steps=1, warmup=1, rounds=1)

# Published shapes: layers, hidden, intermediate, attention heads, key-value heads, vocabulary.
PUBLISHED = {
    "smollm2-135m": (30, 576, 1536, 9, 3, 49152),
    "qwen2.5-0.5b": (24, 896, 4864, 14, 2, 151936),
    "qwen2.5-1.5b": (28, 1536, 8960, 12, 2, 151936),
    "qwen2.5-7b": (28, 3584, 18944, 28, 4, 152064),
    "llama-3.1-8b": (32, 4096, 14336, 32, 8, 128256),
    "mistral-7b": (32, 4096, 14336, 32, 8, 32768),
    "gemma-2-2b": (26, 2304, 9216, 8, 4, 256000),
    "phi-3.5-mini": (32, 3072, 8192, 32, 32, 32064),
    "mixtral-8x7b": (32, 4096, 14336, 32, 8, 32000),
}


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "run"
    result = run_bench(**TINY, gradient_checkpointing="both", output_dir=str(out), log=None)
    return result | {
        "json": json.loads((out / "bench.json").read_text()),
        "md": (out / "bench.md").read_text(),
    }


def test_bench_writes_every_arm_with_and_without_checkpointing(bench):
    out = Path(bench["output_dir"])
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "bench.md", "bench.png"]
    assert (out / "bench.png").read_bytes()[:8] == PNG_MAGIC
    rows = bench["json"]["results"]
    assert sorted((r["arm"], r["gradient_checkpointing"]) for r in rows) == sorted(
        (arm, gc) for arm in ARMS for gc in (False, True)
    )
    for r in rows:
        assert len(r["step_ms"]) == 1 and len(r["step_ms"][0]) == 1  # rounds x steps
        for key in ("median_ms", "measured_speedup", "predicted_speedup", "e2e_speedup"):
            assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, (r["arm"], key)
        assert r["peak_memory_bytes"] is None  # CPU: no per-arm peak
        if r["arm"] == BASELINE:
            assert r["measured_speedup"] == r["predicted_speedup"] == r["e2e_speedup"] == 1.0
    # every row of the table is in bench.md and in what run_bench returned (the CLI prints it)
    assert bench["table"] in bench["md"]
    table_rows = [line for line in bench["table"].splitlines()[2:]]
    assert len(table_rows) == len(rows)
    assert {tuple(c.strip() for c in line.strip("|").split("|")[:2]) for line in table_rows} == {
        (arm, gc) for arm in ARMS for gc in ("on", "off")
    }


def test_bench_arms_spend_the_layer_budget_and_train_from_their_lowest_layer(bench):
    record = bench["json"]
    n = record["model"]["num_layers"]
    assert n == 4
    k = budget(n, record["settings"]["top_pct"])
    baseline_params = {
        r["gradient_checkpointing"]: r["trainable_params"] for r in record["results"] if r["arm"] == BASELINE
    }
    for r in record["results"]:
        if r["arm"] == BASELINE:
            assert r["layers"] == list(range(n))
            continue
        assert len(r["layers"]) == r["num_layers_adapted"] == k
        assert r["lowest_trained_layer"] == min(r["layers"])  # truncate_backward was applied
        assert 0 < r["trainable_params"] < baseline_params[r["gradient_checkpointing"]]
        assert r["probe_charged"] == (r["arm"] not in ("random", "last"))
        # truncate_backward checkpoints the adapted blocks non-reentrantly
        expected = {"use_reentrant": False} if r["gradient_checkpointing"] else None
        assert r["checkpoint_kwargs"] == expected
    last = [r for r in record["results"] if r["arm"] == "last"]
    assert all(r["layers"] == list(range(n - k, n)) for r in last)


def test_bench_json_records_machine_versions_probe_and_settings(bench):
    record = bench["json"]
    assert record["hardware"]["cpu"] and record["hardware"]["device"] == "cpu"
    assert {"torch", "transformers", "peft", "aletheia_lora"} <= set(record["versions"])
    assert record["probe"]["seconds"] > 0 and len(record["probe"]["scores"]["scores"]) == 4
    assert record["model"]["preset"] == "smollm2-135m" and record["model"]["dtype"] == "float32"
    assert record["settings"]["seq_len"] == 16 and record["e2e_steps"] == 200
    assert len(record["cost_model"]["forward"]) == 4


def test_bench_with_one_arm_keeps_the_baseline(tmp_path):
    settings = TINY | {"num_layers": 2, "warmup": 0}
    result = run_bench(
        **settings, arms=["last"], gradient_checkpointing="on", output_dir=str(tmp_path / "o"), log=None
    )
    rows = [(r["arm"], r["gradient_checkpointing"]) for r in result["results"]]
    assert rows == [(BASELINE, True), ("last", True)]
    assert "| last | on |" in (tmp_path / "o" / "bench.md").read_text()


def test_calibrate_fits_the_cost_model_to_other_timed_selections(tmp_path):
    from aletheia_lora.costmodel import CostModel

    result = run_bench(**TINY, arms=["last"], gradient_checkpointing="off", calibrate=True,
                       output_dir=str(tmp_path / "o"), log=None)  # fmt: skip
    assert [c["selection"] for c in result["calibration"]] == list(CALIBRATION)
    assert [c["layers"] for c in result["calibration"]] == [[0, 2], [0], [3]]
    arm_layers = [r["layers"] for r in result["results"]]
    assert not any(c["layers"] in arm_layers for c in result["calibration"])  # predictions are out of sample
    cost = CostModel(**result["cost_model"])
    assert cost.unit == "s"
    points = cost.meta["calibration"]["points"]
    assert [p["measured_s"] * 1000 for p in points] == pytest.approx(
        [c["median_ms"] for c in result["calibration"]]
    )
    for row in result["results"]:  # the predictions come from the calibrated model
        assert row["predicted_speedup"] == pytest.approx(cost.speedup(row["layers"]))
    assert "calibrated in this run on 3 timed selections" in (tmp_path / "o" / "bench.md").read_text()
    assert "not calibrated here" not in (tmp_path / "o" / "bench.md").read_text()


def test_arm_restores_the_base_model_exactly():
    model = tiny_model("llama", num_layers=4)
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    names = [n for n, _ in model.named_parameters()]
    flags = [p.requires_grad for p in model.parameters()]
    for arm, layers in ((BASELINE, [0, 1, 2, 3]), ("last", [2, 3])):
        row = TimedArm(arm, True, layers, 1.0, truncate=arm != BASELINE)
        with arm_model(model, row, lora_kwargs={"r": 4, "lora_alpha": 8}, seed=0) as (peft_model, optimizer):
            blocks = find_blocks(model).blocks
            assert any(b.gradient_checkpointing for b in blocks)
            if arm != BASELINE:  # blocks below the lowest adapted one run without autograd
                assert row.lowest_trained_layer == 2
                assert blocks[0]._forward_pre_hooks and not blocks[2]._forward_pre_hooks
            assert optimizer_step(peft_model, optimizer, {"input_ids": ids, "labels": ids})[1] > 0
        assert [n for n, _ in model.named_parameters()] == names  # LoRA unloaded
        assert [p.requires_grad for p in model.parameters()] == flags
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
        assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)


def test_unknown_preset_error_lists_the_presets(tmp_path, capsys):
    with pytest.raises(ValueError) as err:
        run_bench(random_init="llama-9b", output_dir=str(tmp_path / "o"), log=None)
    assert all(name in str(err.value) for name in preset_names())
    code = main(["bench", "--random_init", "llama-9b", "--output_dir", str(tmp_path / "o")])
    assert code == 1
    stderr = capsys.readouterr().err
    assert "llama-9b" in stderr and all(name in stderr for name in preset_names())
    assert not (tmp_path / "o").exists()


def test_non_empty_output_dir_is_refused(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite_output_dir"):
        run_bench(**TINY, output_dir=str(out), log=None)
    assert main(["bench", "--random_init", "smollm2-135m", "--output_dir", str(out)]) == 1
    assert "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"model": "x", "random_init": "smollm2-135m"}, "one of them"),
        ({"num_layers": 2}, "random_init only"),
        ({"arms": ["top", "best"]}, "unknown arms"),
        ({"dtype": "int8"}, "bf16"),
        ({"steps": 0}, "steps=0"),
    ],
)
def test_bench_arguments_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BenchArguments(**kwargs)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_configs_have_the_published_shapes(name):
    layers, hidden, intermediate, heads, kv_heads, vocab = PUBLISHED[name]
    config = preset_config(name)
    assert (
        config.num_hidden_layers,
        config.hidden_size,
        config.intermediate_size,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.vocab_size,
    ) == PUBLISHED[name]
    assert preset_config(name, num_layers=2).num_hidden_layers == 2
    # the parameter count, from the shapes alone (meta tensors: nothing is allocated)
    T.logging.set_verbosity_error()
    with torch.device("meta"):
        model = T.AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == PRESETS[name].params
    assert find_blocks(model).num_layers == layers


def test_every_preset_is_tested_and_the_list_is_complete():
    required = {"qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b", "llama-3.1-8b", "mistral-7b", "gemma-2-2b",
                "phi-3.5-mini", "mixtral-8x7b", "smollm2-135m"}  # fmt: skip
    assert set(preset_names()) == set(PUBLISHED) == required
    assert preset_config("mixtral-8x7b").num_local_experts == 8


def test_gpu_bench_script_runs_on_cpu_with_small_overrides(tmp_path):
    """The prepared GPU script, at toy size: every run's table at the end, flags passed through,
    and a failed extra run (an unreachable target) reported without losing the others."""
    env = dict(os.environ, PYTHON=sys.executable, HF_HUB_OFFLINE="1", PRESET="smollm2-135m", NUM_LAYERS="2",
               SEQ_LEN="16", BATCH_SIZE="2", STEPS="1", WARMUP="0", ROUNDS="1", EXTRA_ARGS="--e2e_steps 7",
               TARGET_PRESETS="smollm2-135m", TARGET_SPEEDUP="99", RANK_CHECK_PRESETS="smollm2-135m",
               RANK_CHECK_R="4")  # fmt: skip
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_bench.sh"), str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| arm | checkpointing | layers |" in proc.stdout
    for arm in ARMS:  # the table after the run and at the end; the rank run adds lora-all and last, off
        for gc in ("off", "on"):
            extra = 2 if gc == "off" and arm in ("lora-all", "last") else 0
            assert proc.stdout.count(f"| {arm} | {gc} |") == 2 + extra, (arm, gc)
    record = json.loads((tmp_path / "out" / "smollm2-135m" / "bench.json").read_text())
    assert record["settings"]["e2e_steps"] == 7  # EXTRA_ARGS reached the bench
    assert "target_speedup=99.0 is out of reach" in proc.stderr
    assert "(bench smollm2-135m-target failed" in proc.stdout
    ranked = json.loads((tmp_path / "out" / "smollm2-135m-r4" / "bench.json").read_text())
    assert ranked["settings"]["r"] == 4 and ranked["settings"]["gradient_checkpointing"] == "off"
    assert [r["arm"] for r in ranked["results"]] == ["lora-all", "last"]


def test_probe_data_gives_the_scores_and_selection_that_the_probe_command_gives(tmp_path):
    """A real model is probed on task rows through the same data path as `train`/`probe`, so the
    bench times the selections a real run would make (random tokens would give other scores)."""
    from conftest import qa_rows, word_tokenizer, write_jsonl

    tiny_model("llama", num_layers=4).save_pretrained(tmp_path / "model")
    word_tokenizer().save_pretrained(tmp_path / "model")
    write_jsonl(tmp_path / "data.jsonl", qa_rows(40, seed=0))
    common = ["--probe_batches", "3", "--probe_batch_size", "2", "--seed", "0"]
    assert main(["probe", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "data.jsonl"),
                 "--max_length", "32", "--output_dir", str(tmp_path / "probe"), "--quiet", "true",
                 *common]) == 0  # fmt: skip
    probed = json.loads((tmp_path / "probe" / "layer_scores.json").read_text())

    settings = dict(model=str(tmp_path / "model"), seq_len=32, batch_size=2, steps=1, warmup=0, rounds=1,
                    gradient_checkpointing="off", arms=["top"], probe_batches=3, probe_batch_size=2, seed=0)  # fmt: skip
    record = run_bench(
        **settings, probe_data=str(tmp_path / "data.jsonl"), output_dir=str(tmp_path / "b"), log=None
    )
    assert record["probe"]["data"] == str(tmp_path / "data.jsonl")
    assert record["probe"]["scores"]["scores"] == pytest.approx(probed["scores"], rel=1e-5)
    top = next(r for r in record["results"] if r["arm"] == "top")
    assert top["layers"] == probed["meta"]["selected_layers"]
    assert f"rows of {tmp_path / 'data.jsonl'}" in (tmp_path / "b" / "bench.md").read_text()

    on_noise = run_bench(**settings, probe_data="random", output_dir=str(tmp_path / "n"), log=None)
    assert on_noise["probe"]["data"] == "random tokens"
    assert on_noise["probe"]["scores"]["scores"] != pytest.approx(probed["scores"], rel=1e-3)
    by_default = run_bench(
        **settings, output_dir=str(tmp_path / "d"), log=None
    )  # what train probes by default
    assert by_default["probe"]["data"] == "the embedded arithmetic task"
    assert by_default["probe"]["batch_size"] == 2  # as given
    defaults = dict(settings, probe_batch_size=None)
    assert (
        run_bench(**defaults, output_dir=str(tmp_path / "d1"), log=None)["probe"]["batch_size"] == 1
    )  # as train
    noise = run_bench(**defaults, probe_data="random", output_dir=str(tmp_path / "n4"), log=None)
    assert noise["probe"]["batch_size"] == 2  # the bench's batch_size


def test_probe_data_needs_a_real_model():
    with pytest.raises(ValueError, match="drop --probe_data, or use --model"):
        BenchArguments(random_init="smollm2-135m", probe_data="embedded")


def test_target_speedup_steers_the_depth_aware_arm_only(tmp_path):
    settings = TINY | dict(gradient_checkpointing="off", arms=["top", "depth-aware"], log=None)
    plain = run_bench(**settings, output_dir=str(tmp_path / "plain"))
    fast = run_bench(**settings, target_speedup=1.5, output_dir=str(tmp_path / "fast"))
    by_arm = {run: {r["arm"]: r for r in rec["results"]} for run, rec in (("plain", plain), ("fast", fast))}
    assert by_arm["fast"]["depth-aware"]["predicted_speedup"] >= 1.5
    assert by_arm["fast"]["depth-aware"]["layers"] != by_arm["plain"]["depth-aware"]["layers"]
    assert by_arm["fast"]["top"]["layers"] == by_arm["plain"]["top"]["layers"]
    assert "predicted >= 1.5x" in (tmp_path / "fast" / "bench.md").read_text()
    with pytest.raises(ValueError, match="out of reach: the best any selection"):
        run_bench(**settings, target_speedup=50, output_dir=str(tmp_path / "never"))
    with pytest.raises(ValueError, match="target_speedup=0.5"):
        BenchArguments(target_speedup=0.5)


def test_progress_says_how_long_the_timing_will_take(tmp_path):
    lines: list[str] = []
    run_bench(
        **TINY, gradient_checkpointing="off", arms=["top"], output_dir=str(tmp_path / "o"), log=lines.append
    )
    eta = [line for line in lines if "min to go" in line]
    assert len(eta) == 1 and "2 timed rows x 1 rounds" in eta[0]
    assert lines.index(eta[0]) == next(i for i, line in enumerate(lines) if line.startswith("round 1/1")) + 1


def test_preview_script_lists_every_strategy_with_predictions(tmp_path):
    out = tmp_path / "preview"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "preview_selections.py"), "--random_init", "smollm2-135m",
         "--num_layers", "4", "--probe_tokens", "16", "--output_dir", str(out), "--target_speedup", "1.2", "9"],
        env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "preview.json").read_text())
    assert len(record["probe"]["scores"]) == 4
    rows = record["rows"]
    assert [(r["strategy"], r["target_speedup"]) for r in rows[:6]] == [
        ("top", None), ("depth-aware", None), ("random", None), ("last", None), ("depth-aware", 1.2),
        ("depth-aware", 9.0)]  # fmt: skip
    assert [r["gradient_checkpointing"] for r in rows] == [False] * 6 + [True] * 6
    for r in rows:
        if r["target_speedup"] == 9.0:
            assert "out of reach" in r["error"]
        else:
            assert r["count"] == 2 and r["predicted_speedup"] > 1 and 0 < r["captured_share"] <= 1
            assert r["predicted_speedup"] >= (r["target_speedup"] or 1)
    assert "| last | - | off | 2 | 2: [2, 3] |" in (out / "preview.md").read_text()


def test_the_probe_signal_is_a_bench_setting():
    assert probe_config(BenchArguments(score="lora-energy")).score == "lora-energy"
    assert probe_config(BenchArguments()).score == "grad-norm"  # the published score stays the default
    with pytest.raises(ValueError, match="score='gradnorm'"):
        BenchArguments(score="gradnorm")
