"""Tests for aletheia_lora.report: terminal chart, PNG plots and the markdown report."""

from __future__ import annotations

import subprocess
import sys

import pytest

from aletheia_lora.report import plot_layer_scores, plot_loss, terminal_bar_chart, write_report
from aletheia_lora.scores import LayerScores

BLOCKS = {"█": 8, "▉": 7, "▊": 6, "▋": 5, "▌": 4, "▍": 3, "▎": 2, "▏": 1}


def _bar_eighths(line: str) -> int:
    """Length of the bar on one chart line, in eighths of a cell."""
    bar = line.split("│")[1]
    return sum(BLOCKS.get(ch, 0) for ch in bar)


def _layer_lines(chart: str) -> list[str]:
    return chart.splitlines()[1:-1]  # drop header and footer


SCORES = {0: 0.5, 1: 3.0, 2: 1.25, 3: 0.0, 4: 2.2, 5: 0.01}


# --------------------------------------------------------------------------- terminal chart


def test_bar_chart_one_line_per_layer_with_header_and_footer():
    chart = terminal_bar_chart(SCORES, [1, 4])
    lines = chart.splitlines()
    assert len(lines) == len(SCORES) + 2
    body = _layer_lines(chart)
    assert [int(line.split("│")[0]) for line in body] == sorted(SCORES)
    assert lines[-1].startswith("2 of 6 layers selected")
    assert "1, 4" in lines[-1]


def test_bar_chart_marks_only_selected_layers():
    selected = {1, 4}
    for line in _layer_lines(terminal_bar_chart(SCORES, selected)):
        layer = int(line.split("│")[0])
        assert ("◀ selected" in line) == (layer in selected), line


def test_bar_chart_bar_length_monotone_in_score():
    width = 30
    body = _layer_lines(terminal_bar_chart(SCORES, width=width))
    lengths = {int(line.split("│")[0]): _bar_eighths(line) for line in body}
    by_score = sorted(SCORES, key=SCORES.get)
    assert [lengths[i] for i in by_score] == sorted(lengths[i] for i in by_score)
    assert lengths[1] == width * 8  # the maximum fills the bar exactly
    assert lengths[3] == 0
    assert 0 < lengths[5] < lengths[0]  # partial blocks give sub-cell resolution
    # bars are padded, so the score column lines up
    assert len({line.index("│", line.index("│") + 1) for line in body}) == 1


def test_bar_chart_shows_scores_to_four_significant_digits():
    chart = terminal_bar_chart({0: 1.23456789, 1: 1234.5678})
    assert "1.235" in chart
    assert "1235" in chart


def test_bar_chart_all_zero_and_single_layer():
    chart = terminal_bar_chart({0: 0.0, 1: 0.0, 2: 0.0}, [2])
    body = _layer_lines(chart)
    assert len(body) == 3
    assert all(_bar_eighths(line) == 0 for line in body)
    assert "◀ selected" in body[2]
    single = terminal_bar_chart({7: 0.42}, [7], width=10)
    body = _layer_lines(single)
    assert len(body) == 1
    assert _bar_eighths(body[0]) == 80
    assert single.splitlines()[-1] == "1 of 1 layers selected: 7"


# --------------------------------------------------------------------------- PNGs


def _assert_png(path) -> None:
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) > 5_000
    leftovers = [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_plot_layer_scores_plain_and_with_roles(tmp_path):
    plain = tmp_path / "plain.png"
    plot_layer_scores(SCORES, [1, 4], plain, title="plain")
    _assert_png(plain)

    roles = {i: {"attention": 0.6 * s, "mlp": 0.4 * s} for i, s in SCORES.items()}
    roles[5] = {"expert": 0.005, "router": 0.005}
    scores = LayerScores(SCORES, roles=roles)
    stacked = tmp_path / "sub" / "stacked.png"
    plot_layer_scores(scores, [1, 4], stacked)
    _assert_png(stacked)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.png", "sub"]


def test_plot_loss_writes_png_with_and_without_losses(tmp_path):
    history = [
        {"loss": 2.5, "step": 10, "learning_rate": 1e-4},
        {"loss": 2.1, "step": 20},
        {"eval_loss": 2.2, "step": 20},
        {"loss": 1.8, "step": 30},
        {"eval_loss": 1.9, "step": 30},
        {"train_loss": 2.1, "step": 30, "train_runtime": 4.0},
    ]
    with_loss = tmp_path / "loss.png"
    plot_loss(history, with_loss)
    _assert_png(with_loss)

    empty = tmp_path / "empty.png"
    plot_loss([{"train_runtime": 1.0, "step": 0}], empty)
    _assert_png(empty)
    assert with_loss.read_bytes() != empty.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.png", "loss.png"]


def test_import_is_light():
    code = "import sys, aletheia_lora.report; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------- markdown


FULL_INFO = {
    "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "data": "tiny.jsonl",
    "num_layers": 6,
    "selected_layers": [4, 1],
    "scores": {str(k): v for k, v in SCORES.items()},  # as read back from JSON
    "probe_seconds": 12.3456,
    "probe": {"batches": 8, "tokens": 4096, "method": "grad-norm"},
    "trainable_params": 1_234_567,
    "all_layer_trainable_params": 4_938_268,
    "train_seconds_per_step": 0.123456,
    "max_steps": 200,
    "final_train_loss": 1.23456,
    "final_eval_loss": 1.34567,
    "metric_before": {"exact_match": 0.12, "eval_loss": 1.3},
    "metric_after": {"exact_match": 0.31, "eval_loss": 1.1},
    "settings": {"r": 16, "lora_alpha": 32, "top_pct": 33.3, "target": "a|b"},
    "versions": {"torch": "2.5.0", "transformers": "4.56.0"},
    "files": ["scores.json", "layer_scores.png"],
}


def test_write_report_full(tmp_path):
    path = tmp_path / "report.md"
    text = write_report(path, FULL_INFO)
    assert path.read_text(encoding="utf-8") == text
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]

    assert text.startswith("# ")
    assert "2 of 6: 1, 4" in text
    # 1,234,567 / 4,938,268 = 25.0000...%
    assert "1,234,567 (25.0% of all-layer LoRA's 4,938,268)" in text
    assert "12.3 s" in text
    assert "0.123 s" in text
    assert "1.235" in text and "1.346" in text
    # before/after table with a signed change
    assert "| exact_match | 0.12 | 0.31 | +0.19 |" in text
    assert "| eval_loss | 1.3 | 1.1 | -0.2 |" in text
    # per-layer table: every layer once, selected ones marked yes
    for layer, score in SCORES.items():
        expected = "yes" if layer in (1, 4) else "no"
        matches = [ln for ln in text.splitlines() if ln.startswith(f"| {layer} | ")]
        assert len(matches) == 1
        assert matches[0] == f"| {layer} | {score:g} | {expected} |"
    assert "2.5.0" in text and "`lora_alpha` | 32" in text
    assert "a\\|b" in text  # pipes escaped inside table cells
    assert "`layer_scores.png`" in text


@pytest.mark.parametrize(
    "info",
    [
        {},
        {"model": "m"},
        {"trainable_params": 1000},
        {"all_layer_trainable_params": 1000},
        {"selected_layers": [3]},
        {"scores": {0: 1.0}},
        {"metric_after": {"exact_match": 0.5}},
        {"probe": {"seconds": 2.0}},
    ],
)
def test_write_report_survives_sparse_info(tmp_path, info):
    text = write_report(tmp_path / "r.md", info)
    assert text.startswith("# ")
    assert (tmp_path / "r.md").read_text(encoding="utf-8") == text
    for value in info.values():
        if isinstance(value, str):
            assert value in text


def test_write_report_percentage_uneven(tmp_path):
    text = write_report(tmp_path / "r.md", {"trainable_params": 1, "all_layer_trainable_params": 3})
    assert "1 (33.3% of all-layer LoRA's 3)" in text
    assert "% of" not in write_report(tmp_path / "r2.md", {"trainable_params": 5})


def test_a_one_step_run_draws_a_visible_point_and_a_long_run_a_smoothed_curve(tmp_path):
    one = plot_loss([{"loss": 2.0, "step": 1}, {"eval_loss": 2.4, "step": 0}, {"eval_loss": 1.9, "step": 1}],
                    tmp_path / "one.png")  # fmt: skip
    _assert_png(tmp_path / "one.png")
    lines = {line.get_label(): line for line in one.axes[0].get_lines()}
    assert lines["train loss"].get_marker() == "o" and len(lines["train loss"].get_xdata()) == 1
    assert len(lines["held-out loss"].get_xdata()) == 2
    assert one.axes[0].get_title() == "Training and held-out loss"
    many = [{"loss": 3.0 + (0.3 if k % 2 else 0.0), "step": 1 + 10 * k} for k in range(10_000)]
    fig = plot_loss(many, tmp_path / "many.png")
    smooth = next(line for line in fig.axes[0].get_lines() if "moving average" in line.get_label())
    ys = list(smooth.get_ydata())
    assert max(ys[10:-10]) - min(ys[10:-10]) < 0.2  # the 0.3 zig-zag is averaged out


def test_speed_line_never_shows_a_bare_h200_prediction_on_another_machine():
    from aletheia_lora.report import speed_line

    cpu = speed_line(1.8, None, 2.47, "cpu")
    assert (
        "measured 2.47 s/step" in cpu
        and "not fitted to this machine (cpu)" in cpu
        and "--calibrate_cost" in cpu
    )
    calibrated = speed_line(1.3, {"points": [1, 2, 3]}, 2.0, "cpu")
    assert "calibrated on this machine" in calibrated and "not fitted" not in calibrated
    gpu = speed_line(1.8, None, 0.2, "cuda:0")
    assert "fitted on an H200" in gpu and "measured 0.200 s/step" in gpu
