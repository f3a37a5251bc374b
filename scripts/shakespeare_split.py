"""Plain-text language-modelling data, split by play: train on three Shakespeare plays, test on a fourth.

    python scripts/shakespeare_split.py --text_dir ../shared/data/text --output_dir runs/data/shakespeare

Writes train.jsonl (Hamlet, Julius Caesar, Macbeth) and test.jsonl (The Tempest) of ``{"text": ...}``
rows: each play with runs of blank lines collapsed to one, cut at line ends into chunks of under
500 characters (about 125 tokens); a play's last chunk is kept only if it has 100 characters or more.
The held-out play is a domain shift the model never trains on, not a random share of the same text.
Refuses to overwrite an existing output folder.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from aletheia_lora.io import atomic_write_text

TRAIN, TEST = ("hamlet", "julius_caesar", "macbeth"), ("tempest",)


def chunks(text: str, size: int = 500, keep_last: int = 100) -> list[str]:
    """``text`` cut at line ends into pieces of fewer than ``size`` characters (a longer line is its own)."""
    out, current = [], ""
    for line in text.split("\n"):
        if current and len(current) + 1 + len(line) >= size:
            out.append(current.strip())
            current = line
        else:
            current = f"{current}\n{line}" if current else line
    if len(current.strip()) >= keep_last:
        out.append(current.strip())
    return [c for c in out if c]


def play_rows(folder: Path, names: tuple[str, ...]) -> list[dict]:
    rows = []
    for name in names:
        path = folder / f"{name}.txt"
        if not path.is_file():
            raise SystemExit(f"{path} does not exist; point --text_dir at the folder with the four plays.")
        text = re.sub(r"\n{3,}", "\n\n", path.read_text(encoding="utf-8")).strip()
        rows += [{"text": c} for c in chunks(text)]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text_dir", default="../shared/data/text")
    parser.add_argument("--output_dir", default="runs/data/shakespeare")
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty; choose another --output_dir or remove it yourself.")
    out.mkdir(parents=True, exist_ok=True)
    for split, names in (("train", TRAIN), ("test", TEST)):
        rows = play_rows(Path(args.text_dir), names)
        atomic_write_text(out / f"{split}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        print(f"{split}: {len(rows)} rows from {', '.join(names)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
