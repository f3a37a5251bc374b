"""Probe cost, side by side in one process: one-pass vs the chunked reference vs a plain step.

    python scripts/probe_speed.py --output_dir runs/probe-speed [--model M] [--batches 5] [--rounds 3]

Arms, interleaved round by round (median seconds over rounds):
  onepass   gradient_probe(method="onepass")       one forward+backward per batch, no weight grads
  chunked   gradient_probe(method="chunked")       the published reference, 8 blocks per pass
  step      a plain forward+backward per batch with every weight frozen (inputs require grad):
            the floor any probe that back-propagates to block 0 pays
Writes probe_speed.json and probe_speed.md (ratios measured in this one run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from aletheia_lora import find_blocks, gradient_probe
from aletheia_lora.batches import probe_batches
from aletheia_lora.data import load_data, tokenize_dataset
from aletheia_lora.io import atomic_write_text
from aletheia_lora.models import load_model
from aletheia_lora.runs import check_output_dir, versions


def plain_steps(model, batches) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    hook = model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_(True))
    try:
        for batch in batches:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logits[:, :-1].float().logsumexp(-1).mean().backward()
    finally:
        hook.remove()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output_dir", required=True)
    parser.add_argument(
        "--model", default=None, help="local folder / hub id; default: the embedded SmolLM2-135M"
    )
    parser.add_argument("--data", default=None, help="data file; default: the embedded arithmetic task")
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--overwrite_output_dir", action="store_true")
    args = parser.parse_args()

    out = check_output_dir(args.output_dir, overwrite=args.overwrite_output_dir)
    model, tokenizer = load_model(args.model)
    rows = tokenize_dataset(load_data(args.data)[:200], tokenizer, max_length=args.max_length)
    batches = probe_batches(rows, args.batches, 1, seed=42)
    arms = {
        "onepass": lambda: gradient_probe(model, rows, probe_batches=args.batches, method="onepass"),
        "chunked": lambda: gradient_probe(model, rows, probe_batches=args.batches, method="chunked"),
        "step": lambda: plain_steps(model, batches),
    }
    arms["onepass"]()  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(args.rounds):
        for name, run in arms.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    median = {name: statistics.median(v) for name, v in seconds.items()}
    result = {
        "model": args.model or "embedded SmolLM2-135M-Instruct",
        "num_layers": find_blocks(model).num_layers,
        "batches": args.batches,
        "tokens_per_batch": [int(b["attention_mask"].sum()) for b in batches],
        "rounds": args.rounds,
        "seconds": seconds,
        "median_seconds": median,
        "chunked_over_onepass": median["chunked"] / median["onepass"],
        "onepass_over_step": median["onepass"] / median["step"],
        "threads": torch.get_num_threads(),
        "versions": versions(),
    }
    table = [
        f"| arm | median s ({args.batches} batches) | vs one-pass |",
        "|---|---|---|",
        *[f"| {name} | {median[name]:.3g} | {median[name] / median['onepass']:.2f}x |" for name in arms],
    ]
    atomic_write_text(Path(out) / "probe_speed.json", json.dumps(result, indent=1) + "\n")
    atomic_write_text(Path(out) / "probe_speed.md", "\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
