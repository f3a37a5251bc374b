"""One table over the time-to-target cells: per arm and cell, the speedup to all-layer LoRA's final
held-out loss and the loss at equal steps, and on how many cells each arm is faster beyond 2 standard
errors (the test issue 22 sets for a default).

    python scripts/ttt_summary.py docs/results/time-to-target/*/summary.json [--output docs/results/time-to-target/summary.md]

Reads only the records (``aletheia-lora race``'s summary.json); every figure is recomputed from their raw
lists by ``aletheia_lora.race.analyse``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from aletheia_lora.io import atomic_write_text
from aletheia_lora.race import CLOCKS, analyse
from aletheia_lora.report import render_table


def _speed(s: dict) -> str:
    if s.get("mean") is not None:
        se = f" ± {s['se']:.2f}" if s.get("se") is not None else ""
        return f"{s['mean']:.2f}x{se}" + (" *" if s.get("faster") else "")
    if s.get("reached"):
        return f"reached in {s['reached']}/{s['seeds']}"
    return f"not reached (< {s['bound']:.2f}x)" if s.get("bound") else "not reached"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("records", nargs="+")
    parser.add_argument("--output", default=None, help="also write the tables to this markdown file")
    args = parser.parse_args()
    cells = {}
    for path in args.records:
        record = json.loads(Path(path).read_text())
        cells[Path(path).parent.name] = analyse(record)["arms"]
    arms = list(dict.fromkeys(a for c in cells.values() for a in c))
    lines = []
    for clock, title in zip(
        CLOCKS, ("measured, probe included", "measured, training alone", "H200 projection")
    ):
        header = ["arm", *cells, "cells faster beyond 2 se"]
        rows = []
        for arm in arms:
            got = [c[arm][clock]["final"] if arm in c else {} for c in cells.values()]
            rows.append([arm, *map(_speed, got), sum(bool(g.get("faster")) for g in got)])
        lines += [
            f"### Speedup to all-layer LoRA's final held-out loss ({title})",
            "",
            render_table(header, rows),
            "",
        ]
    header = ["arm", *cells]
    rows = []
    for arm in arms:
        row = [arm]
        for c in cells.values():
            s = c.get(arm, {}).get("equal_steps_pct", {})
            sd = f" ± {s['sd']:.1f}" if s.get("sd") is not None else ""
            row.append(f"{s['mean']:+.1f}%{sd}" if s.get("mean") is not None else "")
        rows.append(row)
    lines += ["### Held-out loss at equal steps, vs all-layer LoRA", "", render_table(header, rows), ""]
    text = "\n".join(lines)
    print(text)
    if args.output:
        atomic_write_text(args.output, text)


if __name__ == "__main__":
    main()
