"""The selection question across model x task cells, from finished oracle and study runs.

    python scripts/selection_summary.py --cell smollm2-gsm8k runs/oracle-smollm2-gsm8k runs/study-smollm2-gsm8k \
        --cell gemma-gsm8k runs/oracle-gemma-gsm8k runs/study-gemma-gsm8k ... --output_dir runs/selection-summary

Each ``--cell NAME ORACLE_DIR STUDY_DIR`` (use ``-`` for a run that does not exist yet) adds one
model x task cell. Writes summary.json and summary.md: per cell, each probe signal's Spearman
correlation with the oracle's per-layer utility (and its spread over probe seeds), and the study's
probe-driven arms against their cost-matched random controls and against all-layer LoRA at equal
steps and equal wall-clock. Nothing is recomputed but the table: the numbers are the runs' own.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from aletheia_lora.io import atomic_write_text
from aletheia_lora.report import render_table
from aletheia_lora.study import task_metric

SIGNALS = ("grad-norm", "lora-energy", "relative", "coherence", "contribution", "depth (reference)")


def _load(folder: str, name: str) -> dict[str, Any] | None:
    if folder == "-":
        return None
    path = Path(folder) / name
    if not path.is_file():
        raise SystemExit(f"{path} does not exist; give the run's output folder, or - for a run not made yet.")
    return json.loads(path.read_text())


def oracle_cell(record: dict[str, Any]) -> dict[str, Any]:
    analysis = record.get("analysis") or {}
    across = analysis.get("across_probe_seeds") or {}
    return {
        "layers": len(record.get("layers", {})),
        "base_loss": record.get("base_loss"),
        "cpu_minutes": record.get("cpu_seconds", 0) / 60,
        "wall_minutes": record.get("wall_seconds", 0) / 60,
        "spearman": {name: c["spearman"] for name, c in analysis.get("correlation", {}).items()},
        "spearman_p": {name: c["spearman_p"] for name, c in analysis.get("correlation", {}).items()},
        "across_probe_seeds": {
            name: {k: v.get(k) for k in ("mean", "sd", "min")} for name, v in across.items()
        },
        "additivity": [
            {k: e[k] for k in ("combo", "layers", "joint", "sum_of_singles", "ratio")}
            for e in analysis.get("additivity", [])
        ],
    }


def study_cell(record: dict[str, Any]) -> dict[str, Any]:
    answers = record.get("answers") or {}
    arms: dict[str, list[dict]] = {}
    for a in record.get("arms", []):
        arms.setdefault(a["arm"], []).append(a)
    out: dict[str, Any] = {
        "score": record["settings"].get("score", "grad-norm"),
        "seeds": record.get("seeds"),
        "controls_per_seed": record.get("controls_per_seed"),
        "steps": record["settings"]["steps"],
        "arms": {},
        "vs_matched_random": {},
        "top_vs_all": answers.get("top_vs_all"),
        "vs_all": answers.get("vs_all") or {},  # every selection arm: equal steps, wall-clock, training time
        "probe_stability": {k: v.get("mean") for k, v in (answers.get("probe_stability") or {}).items()},
    }
    for name, runs in arms.items():
        out["arms"][name] = {
            "layers": {str(a["seed"]): a["selected_layers"] for a in runs},
            "nll": (record.get("across_seeds") or {}).get(name, {}).get(task_metric(runs[0]["metrics"])),
            "predicted_speedup": [a.get("predicted_speedup") for a in runs],
            "measured_speedup": [a.get("measured_speedup") for a in runs],
            "vs_all": [a.get("nll_vs_all", a.get("gsm8k_nll_vs_all")) for a in runs],
        }
    for name, m in (answers.get("vs_matched_random") or {}).items():
        keep = ("seeds", "difference", "se", "z", "p_value", "relabellings")
        out["vs_matched_random"][name] = {k: m.get(k) for k in keep} | {
            "arm_nll": m["arm_nll"],
            "control_nll": m["control_nll"],
        }
    return out


def _f(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _ms(x: dict | None, spec: str = ".4f") -> str:
    if not x or x.get("mean") is None:
        return ""
    return f"{x['mean']:{spec}}" + (f" ± {x['sd']:{spec.lstrip('+')}}" if x.get("sd") is not None else "")


def markdown(cells: dict[str, dict[str, Any]]) -> str:
    lines = ["# Which layers? Every model x task cell", ""]
    head = ["cell", *SIGNALS]
    rows = []
    for name, cell in cells.items():
        o = cell.get("oracle")
        if o:
            rows.append([name] + [_f(o["spearman"].get(s), "+.3f") + (
                f" ({_ms(o['across_probe_seeds'].get(s), '+.2f')})" if o["across_probe_seeds"].get(s) else "")
                for s in SIGNALS])  # fmt: skip
    lines += [
        "## Does a signal track per-layer utility? (oracle)",
        "",
        "Spearman ρ between the signal and U (each block fine-tuned alone); in brackets mean ± sd over "
        "probe seeds.",
        "",
        render_table(head, rows),
        "",
    ]
    head = ["cell", "arm", "score", "seeds x controls", "arm NLL", "controls NLL", "Δ", "SE", "Δ/SE", "p",
            "vs all (equal steps)", "predicted", "measured"]  # fmt: skip
    rows = []
    for name, cell in cells.items():
        s = cell.get("study")
        if not s:
            continue
        for arm, m in s["vs_matched_random"].items():
            info = s["arms"].get(arm, {})
            vs = [v for v in info.get("vs_all", []) if v is not None]
            pred = [v for v in info.get("predicted_speedup", []) if v]
            meas = [v for v in info.get("measured_speedup", []) if v]
            rows.append([
                name, arm, s["score"], f"{m['seeds']} x {s['controls_per_seed']}", _ms(m["arm_nll"]),
                _ms(m["control_nll"]), _f(m["difference"], "+.4f"), _f(m["se"], ".4f"), _f(m["z"], "+.2f"),
                _f(m["p_value"], ".4f"), f"{sum(vs) / len(vs):+.1%}" if vs else "",
                f"{sum(pred) / len(pred):.2f}x" if pred else "", f"{sum(meas) / len(meas):.2f}x" if meas else "",
            ])  # fmt: skip
    lines += [
        "## Does the selection beat cost-matched random? (study)",
        "",
        "Controls keep the arm's lowest layer (same backward depth) and draw the rest above it. Δ = controls "
        "- arm in test NLL, mean over seeds (positive: the arm is better); SE from the within-seed spread; "
        "p: one-sided permutation p-value within seeds. vs all: the arm's test NLL relative to all-layer "
        "LoRA at equal steps, mean over seeds.",
        "",
        render_table(head, rows),
        "",
    ]
    head = ["cell", "arm", "lowest block", "predicted (this machine)", "measured", "equal steps",
            "equal wall-clock (probe incl.)", "equal training time"]  # fmt: skip
    rows = []
    for name, cell in cells.items():
        for arm, v in ((cell.get("study") or {}).get("vs_all") or {}).items():
            lowest = sorted({min(x) for x in v["layers"].values()})
            rows.append([
                name, arm, ",".join(map(str, lowest)), _ms(v.get("machine_predicted_speedup"), ".2f"),
                _ms(v.get("measured_speedup"), ".2f"), _ms(v.get("equal_steps"), "+.1%"),
                _ms(v.get("equal_time"), "+.1%"), _ms(v.get("equal_train_time"), "+.1%"),
            ])  # fmt: skip
    if rows:
        lines += [
            "## What each cut buys: against all-layer LoRA at equal steps and equal time (study)",
            "",
            "Test NLL relative to all-layer LoRA of the same seed, mean ± sd over seeds (negative: the "
            "selection is better): at equal steps; against all-layer LoRA given the selection's wall-clock, "
            "probe included; and given its training time alone. Speedups: the cost model calibrated on this "
            "machine (target arms' runs only) and measured side by side.",
            "",
            render_table(head, rows),
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cell", nargs=3, action="append", metavar=("NAME", "ORACLE_DIR", "STUDY_DIR"),
                        required=True)  # fmt: skip
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args(argv)
    cells: dict[str, dict[str, Any]] = {}
    for name, oracle_dir, study_dir in args.cell:
        oracle, study = _load(oracle_dir, "oracle.json"), _load(study_dir, "study.json")
        cells[name] = {
            "oracle_dir": oracle_dir,
            "study_dir": study_dir,
            "oracle": oracle_cell(oracle) if oracle else None,
            "study": study_cell(study) if study else None,
        }
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "summary.json", json.dumps(cells, indent=1) + "\n")
    atomic_write_text(out / "summary.md", markdown(cells))
    print(markdown(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
