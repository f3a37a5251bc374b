"""What the schedules' own bookkeeping costs per step: hooks, statistics, draws and decisions.

Times all-layer LoRA three ways on the same batches, interleaved (timing.interleaved), so drift of the
machine hits each alike:

* ``plain``: no schedule;
* ``freeze-bookkeeping``: a FreezeSchedule that never freezes (threshold ~0): its gradient hooks run on
  every adapter parameter and it decides every ``--interval`` steps, but no backward gets shorter;
* ``drop-bookkeeping``: a DropSchedule whose rates are ~0: its forward hooks and per-step draws run, but
  no backward is skipped.

The overhead is each one's median step time over ``plain``'s. Writes overhead.json and overhead.md.

    python scripts/schedule_overhead.py --output_dir runs/schedule-overhead [--random_init smollm2-135m]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from aletheia_lora.finetune import load_base
from aletheia_lora.plan import wrap_with_plan
from aletheia_lora.presets import preset_config
from aletheia_lora.report import render_table
from aletheia_lora.runs import hardware, versions
from aletheia_lora.schedules import DropSchedule, FreezeSchedule
from aletheia_lora.scores import LayerScores
from aletheia_lora.settings import AletheiaConfig, ModelSettings
from aletheia_lora.timing import interleaved, optimizer_step, random_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument(
        "--random_init", default=None, help="a preset shape instead of --model (e.g. smollm2-135m)"
    )
    parser.add_argument("--num_layers", type=int, default=None, help="with --random_init: blocks to build")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per arm and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--interval", type=int, default=2, help="freeze: decide every this many steps")
    args = parser.parse_args()

    if args.random_init:
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(preset_config(args.random_init, num_layers=args.num_layers))
    else:
        base = load_base(ModelSettings(model=args.model))[0]
    config = AletheiaConfig(r=16, lora_alpha=32, mlp_rank_factor=1)
    layers = list(range(base.config.num_hidden_layers))
    ids = random_tokens(base, args.batch_size, args.seq_len, seed=0)
    batch = {"input_ids": ids, "labels": ids}
    arms = {}
    for name in ("plain", "freeze-bookkeeping", "drop-bookkeeping"):
        model, _ = wrap_with_plan(copy.deepcopy(base), LayerScores({i: 1.0 for i in layers}), layers, config)
        if name == "freeze-bookkeeping":
            schedule = FreezeSchedule(interval=args.interval, threshold=1e-12, min_steps=0, max_frozen=0.5)
        elif name == "drop-bookkeeping":
            schedule = DropSchedule([1e-12] * len(layers), seed=0)
        else:
            schedule = None
        if schedule is not None:
            schedule.attach(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        arms[name] = (model.train(), optimizer, schedule, [0])
    seconds: dict[str, list[float]] = {name: [] for name in arms}

    def step(name: str) -> float:
        model, optimizer, schedule, count = arms[name]
        start = time.perf_counter()
        if isinstance(schedule, DropSchedule):
            schedule.step_begin(count[0])
        optimizer_step(model, optimizer, batch)
        if isinstance(schedule, FreezeSchedule):
            schedule.step_end(count[0] + 1)
        count[0] += 1
        return time.perf_counter() - start

    for name in arms:  # warm-up
        step(name)
    interleaved(
        list(arms), args.rounds, lambda name, rnd: seconds[name].extend(step(name) for _ in range(args.steps))
    )
    median = {name: statistics.median(v) for name, v in seconds.items()}
    overhead = {name: median[name] / median["plain"] - 1 for name in arms}
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = {"args": vars(args), "step_seconds": seconds, "median_seconds": median, "overhead": overhead,
              "hardware": hardware(torch.device("cpu")), "versions": versions()}  # fmt: skip
    (out / "overhead.json").write_text(json.dumps(record, indent=1))
    table = render_table(
        ["arm", "median step (s)", "overhead vs plain"],
        [[name, f"{median[name]:.4f}", f"{100 * overhead[name]:+.1f}%"] for name in arms],
    )
    (out / "overhead.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
