"""Human-readable output of a run: a terminal bar chart, PNG plots and a markdown report.

Importing this module is cheap: matplotlib is imported only inside the plotting functions,
and always drives the headless Agg canvas (no pyplot, no display needed). Every file is
written atomically through :mod:`aletheia_lora.io`.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

from .io import atomic_write_bytes, atomic_write_text

__all__ = [
    "new_figure",
    "plot_layer_scores",
    "plot_loss",
    "render_table",
    "save_png",
    "significant",
    "table_lines",
    "terminal_bar_chart",
    "write_report",
]

# Partial blocks, 1/8 .. 7/8 of a character cell wide.
_PARTIAL_BLOCKS = "▏▎▍▌▋▊▉"
_FULL_BLOCK = "█"
_SELECTED_MARK = "◀ selected"

_ROLE_ORDER = ("attention", "mlp", "expert", "router", "other")
_ROLE_COLOURS = {
    "attention": "#4C72B0",
    "mlp": "#55A868",
    "expert": "#8172B2",
    "router": "#CCB974",
    "other": "#8C8C8C",
}
_SELECTED_COLOUR = "#DD8452"
_UNSELECTED_COLOUR = "#B0B0B0"
_PNG_DPI = 120


# --------------------------------------------------------------------------- formatting


def significant(x: float, digits: int = 3) -> str:
    """``x`` rounded to ``digits`` significant digits, without scientific notation.

    ``significant(1234.5) == "1,230"``, ``significant(0.012345) == "0.0123"``, ``significant(2.0) == "2.00"``.
    """
    x = float(x)
    if not math.isfinite(x):
        return str(x)
    if x == 0:
        return "0"
    decimals = digits - 1 - math.floor(math.log10(abs(x)))
    rounded = round(x, decimals)
    if rounded != 0:  # rounding may have carried into a new digit (9.996 -> 10.0)
        decimals = digits - 1 - math.floor(math.log10(abs(rounded)))
        rounded = round(x, decimals)
    if decimals > 0:
        return f"{rounded:.{decimals}f}"
    return f"{rounded:,.0f}"


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _fmt(x: Any, digits: int = 4) -> str:
    """Sensible text for a table cell: ints with separators, floats to ``digits`` figures
    (trailing zeros dropped: ``0.12`` stays ``0.12``)."""
    if x is None:
        return "—"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        text = significant(x, digits)
        return text.rstrip("0").rstrip(".") if "." in text else text
    if isinstance(x, (list, tuple)):
        return ", ".join(_fmt(v, digits) for v in x)
    return str(x)


def _cell(text: Any) -> str:
    """Make ``text`` safe inside a markdown table cell."""
    return str(text).replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def table_lines(header: Iterable[Any], rows: Iterable[Iterable[Any]]) -> list[str]:
    """A markdown table as lines: the header, the rule, one line per row; every cell escaped."""
    header = [_cell(h) for h in header]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def render_table(header: Iterable[Any], rows: Iterable[Iterable[Any]]) -> str:
    """:func:`table_lines` joined into one string (no trailing newline): the one markdown-table writer."""
    return "\n".join(table_lines(header, rows))


def _layer_list(layers: Iterable[int]) -> str:
    return ", ".join(str(i) for i in layers)


def layer_spans(layers: Iterable[int], sep: str = ",") -> str:
    """Sorted layer indices as runs: ``[0, 1, 2, 5, 7, 8]`` -> ``"0-2,5,7-8"``."""
    layers = sorted(layers)
    spans, start = [], None
    for i, x in enumerate(layers):
        if start is None:
            start = x
        if i + 1 == len(layers) or layers[i + 1] != x + 1:
            spans.append(f"{start}" if start == x else f"{start}-{x}")
            start = None
    return sep.join(spans)


# --------------------------------------------------------------------------- terminal


def _bar(fraction: float, width: int) -> str:
    """A bar ``fraction`` (0..1) of ``width`` cells long, at 1/8-cell resolution."""
    eighths = round(max(0.0, min(1.0, fraction)) * width * 8)
    full, rest = divmod(eighths, 8)
    return _FULL_BLOCK * full + (_PARTIAL_BLOCKS[rest - 1] if rest else "")


def terminal_bar_chart(scores: Mapping[int, float], selected: Iterable[int] = (), *, width: int = 40) -> str:
    """Render per-layer scores as a unicode bar chart, one line per layer.

    Bars are scaled so that the highest score fills ``width`` cells; selected layers end
    with ``◀ selected``. The first line is a header, the last says how many layers are
    selected. All-zero (or empty) scores give empty bars rather than an error.
    """
    width = max(1, int(width))
    layers = sorted(scores)
    chosen = set(selected)
    values = {i: float(scores[i]) for i in layers}
    finite = [v for v in values.values() if math.isfinite(v)]
    top = max(finite, default=0.0)

    idx_w = max([len("layer")] + [len(str(i)) for i in layers])
    texts = {i: f"{values[i]:.4g}" for i in layers}
    score_w = max([len("score")] + [len(t) for t in texts.values()])

    scale = f"full bar = {top:.4g}" if top > 0 else "all scores are 0"
    lines = [f"{'layer':>{idx_w}} │{('gradient score, ' + scale):<{width}}│ {'score':>{score_w}}"]
    for i in layers:
        v = values[i]
        frac = v / top if top > 0 and math.isfinite(v) else 0.0
        line = f"{i:>{idx_w}} │{_bar(frac, width):<{width}}│ {texts[i]:>{score_w}}"
        if i in chosen:
            line += f" {_SELECTED_MARK}"
        lines.append(line)

    marked = [i for i in layers if i in chosen]
    footer = f"{len(marked)} of {len(layers)} layers selected"
    if marked:
        footer += f": {_layer_list(marked)}"
    lines.append(footer)
    return "\n".join(lines)


# --------------------------------------------------------------------------- PNG plots


def new_figure(figsize: tuple[float, float]) -> Any:
    """A matplotlib Figure attached to the headless Agg canvas (no pyplot state)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "plotting needs matplotlib: pip install 'aletheia-lora[plot]' (or matplotlib)"
        ) from e
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Any, path: str | os.PathLike) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_PNG_DPI)
    atomic_write_bytes(path, buf.getvalue())


def _ordered_roles(roles: Mapping[int, Mapping[str, float]]) -> list[str]:
    present = {r for sub in roles.values() for r in sub}
    return [r for r in _ROLE_ORDER if r in present] + sorted(present - set(_ROLE_ORDER))


def plot_layer_scores(
    scores: Mapping[int, float],
    selected: Iterable[int],
    path: str | os.PathLike,
    *,
    title: str | None = None,
) -> None:
    """Write a PNG bar chart of the per-layer scores, selected layers highlighted.

    If ``scores`` carries a ``roles`` breakdown (as :class:`~aletheia_lora.scores.LayerScores`
    does), each bar is stacked by role; selected layers are drawn in full colour on a
    shaded band, the others faded. Without roles, selected bars are orange and the rest grey.
    """
    from matplotlib.patches import Patch

    layers = sorted(scores)
    chosen = set(selected)
    roles: Mapping[int, Mapping[str, float]] = getattr(scores, "roles", None) or {}
    is_sel = [i in chosen for i in layers]

    fig = new_figure((max(6.0, min(20.0, 3.0 + 0.3 * len(layers))), 4.5))
    ax = fig.add_subplot()
    handles: list[Any] = []

    if roles:
        names = _ordered_roles(roles)
        bottom = [0.0] * len(layers)
        for role in names:
            heights = []
            for i in layers:
                if i in roles:
                    heights.append(float(roles[i].get(role, 0.0)))
                else:  # a layer without a breakdown counts as "other"
                    heights.append(float(scores[i]) if role == "other" else 0.0)
            colour = _ROLE_COLOURS.get(role, "#64B5CD")
            alphas = [1.0 if s else 0.35 for s in is_sel]
            bars = ax.bar(layers, heights, bottom=bottom, color=colour, width=0.8)
            for bar, a in zip(bars, alphas):
                bar.set_alpha(a)
            bottom = [b + h for b, h in zip(bottom, heights)]
            handles.append(Patch(color=colour, label=role))
        if any(is_sel):
            for i in layers:
                if i in chosen:
                    ax.axvspan(i - 0.5, i + 0.5, color=_SELECTED_COLOUR, alpha=0.18, lw=0, zorder=0)
            handles.append(Patch(color=_SELECTED_COLOUR, alpha=0.35, label="selected layer (band)"))
        first = _ROLE_COLOURS.get(names[0], "#64B5CD") if names else _UNSELECTED_COLOUR
        handles.append(Patch(color=first, alpha=0.35, label="faded bar = not selected"))
    else:
        colours = [_SELECTED_COLOUR if s else _UNSELECTED_COLOUR for s in is_sel]
        ax.bar(layers, [float(scores[i]) for i in layers], color=colours, width=0.8)
        handles = [
            Patch(color=_SELECTED_COLOUR, label="selected"),
            Patch(color=_UNSELECTED_COLOUR, label="not selected"),
        ]

    if layers and len(layers) <= 48:
        ax.set_xticks(layers)
    ax.set_xlabel("layer")
    ax.set_ylabel("gradient score (sum of Frobenius norms)")
    n_sel = sum(is_sel)
    ax.set_title(title or f"Layer scores ({n_sel} of {len(layers)} layers selected)")
    ax.legend(handles=handles, fontsize="small", loc="best")
    ax.grid(axis="y", alpha=0.3)
    save_png(fig, path)


def _smooth(values: list[float]) -> list[float]:
    """A centred moving average over about 2% of the points (at least 5), for long runs."""
    half = max(2, len(values) // 100)
    out = []
    for i in range(len(values)):
        window = values[max(0, i - half) : i + half + 1]
        out.append(sum(window) / len(window))
    return out


def plot_loss(log_history: list[dict], path: str | os.PathLike) -> Any:
    """Write a PNG of train and held-out loss against step; return the matplotlib Figure.

    Up to 50 training points each get a marker (a one-step run is one visible dot); more get a
    faint raw curve under a moving average. Held-out points are squares.

    ``log_history`` is ``transformers.Trainer.state.log_history``: train entries carry
    ``loss`` and ``step``, eval entries ``eval_loss`` and ``step``. With no loss entries the
    figure just says "no loss logged".
    """

    def points(key: str) -> tuple[list[float], list[float]]:
        pts = [
            (float(e["step"]), float(e[key]))
            for e in log_history or []
            if isinstance(e, Mapping) and _is_number(e.get(key)) and _is_number(e.get("step"))
        ]
        pts.sort()
        return [p[0] for p in pts], [p[1] for p in pts]

    train_x, train_y = points("loss")
    eval_x, eval_y = points("eval_loss")

    fig = new_figure((7.0, 4.5))
    ax = fig.add_subplot()
    if not train_x and not eval_x:
        ax.text(0.5, 0.5, "no loss logged", ha="center", va="center", fontsize=16, transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
    else:
        if train_x and len(train_x) <= 50:  # few points: each one marked (a lone point is still visible)
            ax.plot(train_x, train_y, label="train loss", color="#4C72B0", lw=1.5, marker="o", ms=4)
        elif train_x:  # many: the raw curve faint, a moving average over it
            ax.plot(train_x, train_y, color="#4C72B0", lw=0.6, alpha=0.3, label="train loss")
            ax.plot(train_x, _smooth(train_y), color="#4C72B0", lw=1.8, label="train loss (moving average)")
        if eval_x:
            ax.plot(eval_x, eval_y, label="held-out loss", color="#DD8452", lw=1.5, marker="s", ms=6)
        if len(set(train_x + eval_x)) == 1:  # one step: give the point some room
            ax.set_xlim(train_x[0] - 1 if train_x else eval_x[0] - 1, (train_x or eval_x)[0] + 1)
        ax.legend()
        ax.grid(alpha=0.3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Training and held-out loss")
    save_png(fig, path)
    return fig


# --------------------------------------------------------------------------- markdown


def _int_keys(scores: Mapping[Any, Any]) -> dict[int, Any]:
    out: dict[int, Any] = {}
    for k, v in scores.items():
        try:
            out[int(k)] = v
        except (TypeError, ValueError):
            continue
    return out


def _params_text(n: Any, total: Any) -> str:
    if not _is_number(n):
        return _fmt(n)
    text = f"{int(n):,}"
    if _is_number(total) and total > 0:
        pct = 100.0 * n / total
        text += f" ({significant(pct, 3)}% of all-layer LoRA's {int(total):,})"
    return text


STEP_STATISTIC = "median over the run's steps, the first (warm-up) step excluded"


def speed_line(
    predicted: float | None,
    calibration: Mapping[str, Any] | None,
    seconds_per_step: float | None,
    device: str | None = None,
) -> str:
    """The speed of a run, true where it is printed: the measured seconds per step, and the predicted
    speedup over all-layer LoRA only with where its cost model comes from (an H200's costs are not
    this machine's, and a bare H200 figure on a CPU would mislead)."""
    parts = []
    if _is_number(seconds_per_step):
        parts.append(f"measured {significant(seconds_per_step, 3)} s/step ({STEP_STATISTIC})")
    if _is_number(predicted):
        if calibration and calibration.get("points"):
            parts.append(
                f"predicted {predicted:.2f}x faster per step than all-layer LoRA ({cost_model_note(calibration)})"
            )
        elif device is not None and "cuda" not in str(device):
            parts.append(
                f"on an H200 the cost model predicts {predicted:.2f}x over all-layer LoRA; it was not fitted to "
                f"this machine ({device}): --calibrate_cost true fits it here, `aletheia-lora bench` measures it"
            )
        else:
            parts.append(
                f"predicted {predicted:.2f}x faster per step than all-layer LoRA ({cost_model_note(calibration)})"
            )
    return "; ".join(parts)


def exact_match_note(metrics: Mapping[str, Any]) -> str | None:
    """How exact match was scored (or why not), for the reports."""
    if "exact_match" in metrics:
        return (
            f"exact match: greedy answers to {metrics.get('exact_match_n')} held-out questions, compared on the "
            f"final number; generation stops at EOS or a complete '#### <number>', at most "
            f"{metrics.get('max_new_tokens')} new tokens; {metrics.get('cut_off', 0)} answer(s) hit the limit unfinished"
        )
    if metrics.get("exact_match_skipped"):
        return f"exact match not scored: {metrics['exact_match_skipped']}"
    return None


def checkpoints_text(checkpoints: Iterable[Mapping[str, Any]]) -> str:
    """``checkpoint-60 (81 MB)``, for the 'wrote' line and the report."""
    return ", ".join(f"{c['folder']}/ ({c['bytes'] / 1e6:,.0f} MB)" for c in checkpoints)


def cost_model_note(calibration: Mapping[str, Any] | None) -> str:
    """Where a predicted speedup comes from, for the reports."""
    if calibration and calibration.get("points"):
        n = len(calibration["points"])
        note = f"cost model calibrated on this machine on {n} timed selections"
        if n > 3 and _is_number(
            calibration.get("max_relative_error")
        ):  # three points fit three scales exactly
            note += f", largest fit error {calibration['max_relative_error']:.0%}"
        return note
    return "cost model fitted on an H200"


def _summary_rows(info: Mapping[str, Any]) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for key, label in (("model", "model"), ("data", "data")):
        if info.get(key) is not None:
            rows.append((label, str(info[key])))
    num_layers = info.get("num_layers")
    if num_layers is not None:
        rows.append(("layers", _fmt(num_layers)))
    sel = info.get("selected_layers")
    if sel is not None:
        sel = sorted(sel)
        of = f" of {num_layers}" if _is_number(num_layers) else ""
        rows.append(("selected layers", f"{len(sel)}{of}: {_layer_list(sel) or 'none'}"))
    if info.get("trainable_params") is not None:
        rows.append(
            (
                "trainable parameters",
                _params_text(info["trainable_params"], info.get("all_layer_trainable_params")),
            )
        )
    elif info.get("all_layer_trainable_params") is not None:
        rows.append(("all-layer LoRA parameters", _fmt(info["all_layer_trainable_params"])))
    if _is_number(info.get("predicted_speedup")):
        rows.append(
            (
                "speed",
                speed_line(info["predicted_speedup"], info.get("calibration"), info.get("train_seconds_per_step"),
                           info.get("device")),
            )
        )  # fmt: skip
    probe = info.get("probe") if isinstance(info.get("probe"), Mapping) else {}
    probe_s = info.get("probe_seconds", probe.get("seconds"))
    if _is_number(probe_s):
        rows.append(("probe time", f"{significant(probe_s, 3)} s"))
    if _is_number(info.get("train_seconds_per_step")):
        rows.append(
            ("seconds per step", f"{significant(info['train_seconds_per_step'], 3)} s ({STEP_STATISTIC})")
        )
    steps = info.get("steps", info.get("max_steps"))
    if steps is not None:
        rows.append(("steps", _fmt(steps)))
    for key, label in (("final_train_loss", "final train loss"), ("final_eval_loss", "final eval loss")):
        if info.get(key) is not None:
            rows.append((label, _fmt(info[key], 4)))
    return rows


def _metric_rows(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[tuple[str, str, str, str]]:
    rows = []
    for name in list(dict.fromkeys([*before, *after])):
        b, a = before.get(name), after.get(name)
        change = _fmt(a - b, 4) if _is_number(a) and _is_number(b) else "—"
        if change not in ("—", "0") and not change.startswith("-"):
            change = "+" + change
        rows.append((str(name), _fmt(b), _fmt(a), change))
    return rows


def write_report(path: str | os.PathLike, info: dict) -> str:
    """Write a markdown report of a run to ``path`` (atomically) and return its text.

    Every key of ``info`` is optional; sections whose data is missing are left out.
    Keys read: ``model``, ``data``,
    ``num_layers``, ``selected_layers``, ``scores``, ``probe_seconds``, ``probe``,
    ``trainable_params``, ``all_layer_trainable_params``, ``train_seconds_per_step``,
    ``max_steps``/``steps``, ``final_train_loss``, ``final_eval_loss``, ``metric_before``,
    ``metric_after``, ``settings``, ``versions``, ``files``.
    """
    info = dict(info or {})
    lines = ["# aletheia-lora report", ""]

    summary = _summary_rows(info)
    if summary:
        lines += ["## Summary", "", *table_lines(("", "value"), summary), ""]

    before = info.get("metric_before") if isinstance(info.get("metric_before"), Mapping) else {}
    after = info.get("metric_after") if isinstance(info.get("metric_after"), Mapping) else {}
    if before or after:
        lines += ["## Metrics before / after training", ""]
        lines += [*table_lines(("metric", "before", "after", "change"), _metric_rows(before, after)), ""]
        if info.get("exact_match_note"):
            lines += [f"How: {info['exact_match_note']}.", ""]

    scores = _int_keys(info["scores"]) if isinstance(info.get("scores"), Mapping) else {}
    if scores:
        chosen = set(info.get("selected_layers") or ())
        rows = [(i, _fmt(scores[i], 4), "yes" if i in chosen else "no") for i in sorted(scores)]
        lines += ["## Per-layer scores", "", *table_lines(("layer", "score", "selected"), rows), ""]

    for key, heading in (("probe", "Probe"), ("settings", "Settings"), ("versions", "Versions")):
        section = info.get(key)
        if isinstance(section, Mapping) and section:
            rows = [(f"`{k}`", _fmt(v)) for k, v in section.items()]
            lines += [f"## {heading}", "", *table_lines(("key", "value"), rows), ""]

    files = info.get("files")
    if files:
        lines += ["## Files", "", *[f"- `{f}`" for f in files], ""]
    if info.get("checkpoints"):
        lines += [f"Checkpoints kept (to resume from; `--save_total_limit` sets how many): "
                  f"{checkpoints_text(info['checkpoints'])}.", ""]  # fmt: skip

    text = "\n".join(lines).rstrip("\n") + "\n"
    atomic_write_text(path, text)
    return text
