"""What each strategy picks on a preset's random weights, and the speedup the cost model
predicts for it, without timing anything: a preview of what `aletheia-lora bench --random_init`
(and scripts/gpu_bench.sh) will run, made on a CPU.

    python scripts/preview_selections.py --random_init llama-3.1-8b --output_dir runs/preview-llama \
        [--target_speedup 1.45 ...] [--dtype bf16] [--probe_tokens 128] [--probe_batches 2]

The probe runs on random tokens (like the bench's), but short ones (`--probe_tokens`, one row
per batch) so that an 8B shape fits a CPU: Llama-3.1-8B in bf16 takes about 16 GB and 2 minutes
to build and 16 s to probe on 2 cores. The cost model is counted at the bench shape
(`--batch_size`, `--seq_len`) and is not calibrated: these are predictions, not measurements.
Writes preview.json and preview.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from aletheia_lora import gradient_probe, select_layers
from aletheia_lora.bench import BenchArguments, build_model, probe_rows
from aletheia_lora.costmodel import cost_model
from aletheia_lora.io import atomic_write_text
from aletheia_lora.runs import check_output_dir, versions


def preview(args: argparse.Namespace) -> dict:
    # the bench's own model and probe rows, at a short length and one row per batch
    bench_args = BenchArguments(random_init=args.random_init, num_layers=args.num_layers, seed=args.seed,
                                seq_len=args.probe_tokens, probe_batches=args.probe_batches, probe_batch_size=1)  # fmt: skip
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    start = time.perf_counter()
    model, info, _ = build_model(bench_args, torch.device("cpu"), dtype)
    built = time.perf_counter() - start
    rows = probe_rows(bench_args, None, model.get_input_embeddings().num_embeddings)
    start = time.perf_counter()
    scores = gradient_probe(model, rows, probe_batches=args.probe_batches, batch_size=1)
    probed = time.perf_counter() - start
    cost = cost_model(model, batch_size=args.batch_size, seq_len=args.seq_len, r=args.r)
    total = sum(scores.values())
    picks = [(s, None) for s in ("top", "depth-aware", "random", "last")]
    picks += [("depth-aware", t) for t in args.target_speedup]
    rows_out = []
    for gc in (False, True):
        for strategy, target in picks:
            row = {"strategy": strategy, "target_speedup": target, "gradient_checkpointing": gc}
            try:
                layers = select_layers(scores, args.top_pct, strategy=strategy, seed=args.seed, cost=cost,
                                       target_speedup=target, gradient_checkpointing=gc)  # fmt: skip
            except ValueError as err:  # an unreachable target: the message names the best reachable
                rows_out.append(row | {"error": str(err)})
                continue
            rows_out.append(row | {
                "layers": layers,
                "lowest": layers[0],
                "count": len(layers),
                "captured_share": sum(scores[i] for i in layers) / total,
                "predicted_speedup": cost.speedup(layers, gradient_checkpointing=gc),
            })  # fmt: skip
    return {
        "model": info | {"num_layers": len(scores)},
        "probe": {
            "batches": args.probe_batches,
            "tokens": args.probe_tokens,
            "seconds": probed,
            "scores": {int(i): float(v) for i, v in scores.items()},
        },  # fmt: skip
        "build_seconds": built,
        "cost_model": f"FLOP counts at batch {args.batch_size} x {args.seq_len}, r={args.r}, not calibrated",
        "top_pct": args.top_pct,
        "versions": versions(),
        "rows": rows_out,
    }


def markdown(record: dict) -> str:
    scores = record["probe"]["scores"]
    lines = [
        f"# Selections on random weights: {record['model']['preset']} ({record['model']['num_layers']} blocks, "
        f"{record['model']['dtype']})",
        "",
        f"Probe: {record['probe']['batches']} batches of 1 x {record['probe']['tokens']} random tokens, "
        f"{record['probe']['seconds']:.0f} s. Scores, block 0 first: "
        + ", ".join(f"{v:.1f}" for v in scores.values()),
        f"Cost model: {record['cost_model']}. Budget: top_pct={record['top_pct']:g}. Predicted, not measured.",
        "",
        "| strategy | target | checkpointing | lowest | layers | share of the score | predicted speedup |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in record["rows"]:
        head = f"| {r['strategy']} | {r['target_speedup'] or '-'} | {'on' if r['gradient_checkpointing'] else 'off'} |"
        if "error" in r:
            lines.append(f"{head} - | {r['error']} | - | - |")
        else:
            lines.append(f"{head} {r['lowest']} | {r['count']}: {r['layers']} | {r['captured_share']:.1%} | "
                         f"{r['predicted_speedup']:.2f}x |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--random_init", required=True, help="A preset, as aletheia-lora bench takes it.")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--num_layers", type=int, default=None)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--probe_tokens", type=int, default=128)
    parser.add_argument("--probe_batches", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=4, help="Bench shape the cost model counts.")
    parser.add_argument("--seq_len", type=int, default=1024, help="Bench shape the cost model counts.")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--top_pct", type=float, default=50)
    parser.add_argument("--target_speedup", type=float, nargs="*", default=[1.45])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite_output_dir", action="store_true")
    args = parser.parse_args(argv)
    out = check_output_dir(args.output_dir, overwrite=args.overwrite_output_dir, create=True)
    record = preview(args)
    atomic_write_text(out / "preview.json", json.dumps(record, indent=1) + "\n")
    text = markdown(record)
    atomic_write_text(out / "preview.md", text)
    print(text)
    print(f"wrote preview.json, preview.md to {Path(out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
