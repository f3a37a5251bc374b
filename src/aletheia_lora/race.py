"""``aletheia-lora race``: which arm reaches all-layer LoRA's quality first, in training time.

Every arm of a seed trains at once, round-robin, one optimizer step each in turn (the order rotating
every step), on the same batches from the same LoRA initialisation::

    step 1: lora-all, top, freeze, drop      step 2: top, freeze, drop, lora-all      ...

Each step is timed where it runs (device-synchronised), so arm k's step t is measured within seconds
of every other arm's step t: drift of the machine (another process, thermal state) hits all arms
alike, and every schedule's own work (the freezing statistic, the drop draws) is inside its time.
Every ``eval_every`` steps all arms' held-out loss is measured, outside the timed region. Probe-driven
arms start their clock at the probe's time. :mod:`time_to_target` turns the curves into times and
speedups; ``summary.json`` holds every raw list, written after each seed (``--resume true`` continues).

Arms: ``lora-all`` (the reference), ``top`` (the probe's static pick), ``depth-aware@1.3x`` (a cut
predicted 1.3x faster by a cost model calibrated on this machine), ``freeze`` (progressive freezing
from all blocks), ``drop@1.3x`` (probe-weighted backward dropping on all blocks, rates set to a
predicted 1.3x step cost).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import get_linear_schedule_with_warmup

from .architecture import find_blocks
from .batches import collate
from .costmodel import CostModel
from .data import load_data, prepare_data, tokenize_dataset
from .evaluation import mean_loss
from .finetune import batch_order, load_base
from .io import atomic_write_text
from .plan import machine_cost, planned_cost, run_probe, select, wrap_with_plan
from .report import layer_spans, new_figure, render_table, save_png
from .runs import check_output_dir, hardware, resumable_record, versions
from .schedules import DropSchedule, FreezeSchedule, Schedule, drop_rates, scheduled_step_cost
from .settings import (
    AletheiaConfig,
    BudgetSettings,
    DataSettings,
    ModelSettings,
    OutputDirSettings,
    ScheduleTuning,
    at_least,
)
from .suites import sample
from .time_to_target import TARGETS, common_grid, equal_steps, seed_times, spread, summarize_arm
from .timing import optimizer_step

REFERENCE = "lora-all"
DEFAULT_ARMS = (REFERENCE, "top", "depth-aware@1.3x", "freeze", "drop@1.3x")
FILES = ("summary.json", "race.md", "race.png")
_TARGETED = re.compile(r"^(depth-aware|drop)@(\d+(?:\.\d+)?)x$")
_FREEZE_AT = re.compile(r"^freeze@(\d*\.?\d+)$")  # freeze@0.6: the freeze arm at another threshold


@dataclass(frozen=True)
class RaceArm:
    """``strategy``: how the adapted layers are picked (None: every layer); ``schedule``: what changes over
    the run (``freeze``, ``drop``); ``target``: the predicted step speedup a cut or a drop rate aims at;
    ``threshold``: a freeze arm's own ``freeze_threshold`` (``freeze@0.6``)."""

    name: str
    strategy: str | None = None
    schedule: str | None = None
    target: float | None = None
    threshold: float | None = None

    @property
    def probed(self) -> bool:
        """Whether the arm reads the probe (and pays its time)."""
        return self.strategy is not None or self.schedule == "drop"


def race_arm(name: str) -> RaceArm:
    """The arm called ``name``: lora-all, top, freeze, freeze@THRESHOLD, depth-aware@Tx or drop@Tx (T > 1)."""
    fixed = {
        REFERENCE: RaceArm(REFERENCE),
        "top": RaceArm("top", "top"),
        "freeze": RaceArm("freeze", None, "freeze"),
    }
    if name in fixed:
        return fixed[name]
    freeze_at = _FREEZE_AT.match(name)
    if freeze_at and float(freeze_at.group(1)) > 0:
        return RaceArm(name, None, "freeze", threshold=float(freeze_at.group(1)))
    match = _TARGETED.match(name)
    if match is None or not float(match.group(2)) > 1:
        raise ValueError(
            f"arm {name!r} is unknown; use {', '.join(fixed)}, freeze@THRESHOLD (e.g. freeze@0.6), "
            f"depth-aware@TARGETx or drop@TARGETx with a target speedup above 1 (e.g. drop@1.3x)."
        )
    kind, target = match.group(1), float(match.group(2))
    return (
        RaceArm(name, "depth-aware", None, target)
        if kind == "depth-aware"
        else RaceArm(name, None, "drop", target)
    )


@dataclass(kw_only=True)
class RaceArguments(ModelSettings, BudgetSettings, ScheduleTuning, OutputDirSettings):
    """Settings of ``aletheia-lora race``; every field is a flag of the same name."""

    gsm8k_dir: str | None = field(
        default=None,
        metadata={"help": "Folder with train.jsonl and test.jsonl of {question, answer} rows (GSM8K)."},
    )
    data: str | None = field(
        default=None,
        metadata={"help": "Task data instead of --gsm8k_dir, any file or folder train reads; its test split (else a "
                  "seeded held-out share) gives the held-out loss."},
    )  # fmt: skip
    format: str | None = field(default=None, metadata={"help": "Row format of --data (default: detect)."})
    arms: list[str] = field(
        default_factory=lambda: list(DEFAULT_ARMS),
        metadata={
            "help": "Arms (lora-all always runs): lora-all, top, freeze, depth-aware@TARGETx, drop@TARGETx."
        },
    )
    seeds: list[int] = field(
        default_factory=lambda: [0], metadata={"help": "Seeds (data order, LoRA init, probe)."}
    )
    steps: int = field(default=128, metadata={"help": "Optimizer steps per arm."})
    eval_every: int = field(default=8, metadata={"help": "Held-out loss every this many steps (and at 0)."})
    batch_size: int = field(default=2, metadata={"help": "Examples per step."})
    max_length: int = field(default=128, metadata={"help": "Truncate training examples to this many tokens."})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate (linear decay)."})
    warmup_steps: int = field(default=2, metadata={"help": "Linear warm-up steps."})
    r: int = field(default=16, metadata={"help": "LoRA rank of every arm (alpha = 2 r)."})
    probe_batches: int = field(default=5, metadata={"help": "Gradient-probe batches."})
    test_limit: int = field(default=40, metadata={"help": "Held-out rows for the loss."})
    eval_batch_size: int = field(default=8, metadata={"help": "Rows per evaluation forward pass."})
    resume: bool = field(default=False, metadata={"help": "Keep the seeds an earlier run with the same settings "
                                                          "finished."})  # fmt: skip

    def _check(self) -> None:
        if not self.output_dir:
            raise ValueError("race needs --output_dir: summary.json is written there after every seed.")
        if isinstance(self.arms, str):
            self.arms = [self.arms]
        self.arms = [REFERENCE, *dict.fromkeys(a for a in self.arms if a != REFERENCE)]
        for name in self.arms:
            race_arm(name)
        if isinstance(self.seeds, int):
            self.seeds = [self.seeds]
        if not self.seeds:
            raise ValueError("seeds=[]; give at least one seed, e.g. --seeds 0 1 2.")
        self.seeds = list(dict.fromkeys(self.seeds))
        at_least(self, 1, "steps", "eval_every", "batch_size", "max_length", "r", "probe_batches", "test_limit",
                 "eval_batch_size")  # fmt: skip
        at_least(self, 0, "warmup_steps")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate={self.learning_rate}; it must be > 0.")
        if (self.gsm8k_dir is None) == (self.data is None):
            raise ValueError(
                f"gsm8k_dir={self.gsm8k_dir!r}, data={self.data!r}: give exactly one task, --gsm8k_dir or --data."
            )
        if self.gsm8k_dir is not None:
            missing = [f for f in ("train.jsonl", "test.jsonl") if not (Path(self.gsm8k_dir) / f).is_file()]
            if missing:
                raise FileNotFoundError(
                    f"gsm8k_dir={self.gsm8k_dir!r} lacks {', '.join(missing)}; point it at a folder with train.jsonl "
                    f"and test.jsonl of {{question, answer}} rows."
                )

    def fingerprint(self) -> dict[str, Any]:
        """The settings that change results (what ``--resume`` must match); seeds and arms only add runs."""
        skip = {"arms", "seeds", "output_dir", "resume", "overwrite_output_dir", "quiet", "trust_remote_code"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}

    @classmethod
    def default_of(cls, name: str) -> Any:
        f = cls.__dataclass_fields__[name]
        return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default

    def config(self, seed: int, arm: RaceArm | None = None) -> AletheiaConfig:
        """The selection and LoRA settings of ``arm`` (uniform rank ``r`` for every arm)."""
        return AletheiaConfig(
            top_pct=self.top_pct,
            top_k=self.top_k,
            strategy=(arm.strategy if arm and arm.strategy else "top"),
            target_speedup=arm.target if arm and arm.strategy else None,
            probe_batches=self.probe_batches,
            r=self.r,
            lora_alpha=2 * self.r,
            mlp_rank_factor=1,
            seed=seed,
        )


# --------------------------------------------------------------------------- the task


def load_race_task(args: RaceArguments, tokenizer) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """Tokenized training rows, tokenized held-out rows (loss on the answer / completion only), and what
    the record says about them."""
    if args.data is not None:
        prepared = prepare_data(
            DataSettings(data=args.data, format=args.format, max_length=args.max_length,
                         max_eval_samples=args.test_limit),
            tokenizer,
            args.seeds[0],
        )  # fmt: skip
        return prepared.train, prepared.eval, {"name": args.data, "format": prepared.format}
    folder = Path(args.gsm8k_dir)
    train = tokenize_dataset(load_data(str(folder / "train.jsonl")), tokenizer, format="question_answer",
                             max_length=args.max_length)  # fmt: skip
    test = sample(load_data(str(folder / "test.jsonl")), args.test_limit, args.seeds[0])
    heldout = tokenize_dataset(test, tokenizer, format="question_answer", max_length=2 * args.max_length)
    return train, heldout, {"name": "GSM8K", "format": "question_answer"}


# --------------------------------------------------------------------------- one arm while it races


class Contender:
    """One arm of one seed: its PEFT model, optimizer, schedule, and what it has done so far."""

    def __init__(self, arm: RaceArm, model: nn.Module, selected: list[int], schedule: Schedule | None,
                 args: RaceArguments, probe_seconds: float) -> None:  # fmt: skip
        self.arm, self.model, self.selected, self.schedule = arm, model, selected, schedule
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=0.0)
        self.lr = get_linear_schedule_with_warmup(self.optimizer, args.warmup_steps, args.steps)
        self.probe_seconds = probe_seconds
        self.step_seconds: list[float] = []
        self.losses: list[float] = []
        self.lowest: list[int] = []  # per step: the lowest block whose backward ran
        self.dropped: list[list[int]] = []  # per step: the blocks whose backward was skipped
        self.curve: dict[str, list] = {"steps": [], "train_seconds": [], "heldout_loss": []}
        if schedule is not None:
            schedule.attach(model)
        model.train()

    def step(self, step: int, batch: dict[str, torch.Tensor]) -> None:
        start = time.perf_counter()
        if isinstance(self.schedule, DropSchedule):
            self.schedule.step_begin(step)
        loss, _ = optimizer_step(self.model, self.optimizer, batch, clip=1.0, schedule=self.lr)
        if isinstance(self.schedule, FreezeSchedule):
            self.schedule.step_end(step + 1)
        self.step_seconds.append(time.perf_counter() - start)
        self.losses.append(loss.item())
        frozen = self.schedule.frozen_blocks if isinstance(self.schedule, FreezeSchedule) else []
        self.lowest.append(min(set(self.selected) - set(frozen)))
        self.dropped.append(sorted(self.schedule.dropped) if isinstance(self.schedule, DropSchedule) else [])

    def evaluate(self, step: int, heldout: list[dict], args: RaceArguments, pad: int) -> float:
        self.model.eval()
        loss = mean_loss(self.model, heldout, batch_size=args.eval_batch_size, pad_token_id=pad)
        self.model.train()
        self.record_point(step, loss)
        return loss

    def record_point(self, step: int, loss: float) -> None:
        self.curve["steps"].append(step)
        self.curve["train_seconds"].append(sum(self.step_seconds))
        self.curve["heldout_loss"].append(loss)

    def result(self) -> dict[str, Any]:
        out = {
            "arm": self.arm.name,
            "selected_layers": self.selected,
            "probe_seconds": self.probe_seconds,
            **self.curve,
            "step_seconds": self.step_seconds,
            "train_losses": self.losses,
            "lowest_block": self.lowest,
            "dropped_blocks": self.dropped,
            "median_step_seconds": statistics.median(self.step_seconds[1:] or self.step_seconds),
        }
        if self.schedule is not None:
            out["schedule"] = self.schedule.state_dict()
        return out


def _contenders(
    base, tokenizer, rows, args: RaceArguments, seed: int, cost: CostModel | None, log
) -> list[Contender]:
    probe_config = args.config(seed)
    scores, probe_seconds = run_probe(base, rows, probe_config, tokenizer=tokenizer)
    n = find_blocks(base).num_layers
    log(f"seed {seed}: probe {probe_seconds:.1f} s")
    out = []
    for name in args.arms:
        arm = race_arm(name)
        config = args.config(seed, arm)
        model = copy.deepcopy(base)
        selected = select(scores, config, model=model, cost=cost) if arm.strategy else list(range(n))
        peft_model, _ = wrap_with_plan(model, scores, selected, config)
        schedule: Schedule | None = None
        if arm.schedule == "freeze":
            schedule = FreezeSchedule(interval=args.freeze_interval, threshold=arm.threshold or args.freeze_threshold,
                                      min_steps=args.freeze_min_steps, max_frozen=args.freeze_max_frozen)  # fmt: skip
        elif arm.schedule == "drop":
            rates, predicted = drop_rates([scores[i] for i in range(n)], selected, cost, target_speedup=arm.target,
                                          max_rate=args.max_drop_rate)  # fmt: skip
            log(f"seed {seed}: {name} drop rates {[round(r, 2) for r in rates]} (predicted {predicted:.2f}x)")
            schedule = DropSchedule(rates, seed=seed)
        out.append(Contender(arm, peft_model, selected, schedule, args, probe_seconds if arm.probed else 0.0))
    return out


def race_seed(
    base, tokenizer, rows, heldout, args: RaceArguments, seed: int, cost, base_loss: float, log
) -> list[dict]:
    """Train every arm of ``seed`` round-robin with held-out evaluations; one result per arm."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(base.parameters()).device
    contenders = _contenders(base, tokenizer, rows, args, seed, cost, log)
    for c in contenders:  # LoRA starts as the identity: every arm's step-0 loss is the base model's
        c.record_point(0, base_loss)
    order = batch_order(len(rows), args.steps, args.batch_size, seed)
    start = time.perf_counter()
    for step, indices in enumerate(order):
        batch = {k: v.to(device) for k, v in collate([rows[i] for i in indices], pad).items()}
        k = step % len(contenders)
        for c in contenders[k:] + contenders[:k]:
            try:
                c.step(step, batch)
            except FloatingPointError as err:
                raise FloatingPointError(f"{c.arm.name}, seed {seed}, step {step}: {err}") from None
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            losses = {c.arm.name: c.evaluate(step + 1, heldout, args, pad) for c in contenders}
            done = time.perf_counter() - start
            log(f"seed {seed} step {step + 1}/{args.steps} ({done / 60:.1f} min): "
                + ", ".join(f"{n} {v:.4f}" for n, v in losses.items()))  # fmt: skip
    return [c.result() | {"seed": seed} for c in contenders]


# --------------------------------------------------------------------------- analysis


def _curves(runs: dict[str, dict], clock: str) -> dict[str, dict[str, list]]:
    """Each arm's held-out loss against ``clock``: ``wall`` (training seconds, the probe's included),
    ``train`` (training seconds only) or ``h200`` (projected H200 time in all-layer steps, probe included)."""

    def times(r: dict) -> list[float]:
        if clock == "h200":
            return r["h200_units"]
        return [(r["probe_seconds"] if clock == "wall" else 0.0) + t for t in r["train_seconds"]]

    return {a: {"train_seconds": times(r), "heldout_loss": r["heldout_loss"]} for a, r in runs.items()}


CLOCKS = ("wall", "train", "h200")


def _h200_steps(run: dict) -> float:
    """The run's projected H200 training time without the probe, in all-layer steps."""
    return run["h200_units"][-1] - (run["h200_units"][0] if run["steps"][0] == 0 else 0.0)


def analyse(record: dict[str, Any]) -> dict[str, Any]:
    """Per seed and arm: times to each target and speedups over lora-all on each clock (:data:`CLOCKS`); per
    arm: their spread over seeds, the equal-steps loss gap and the equal-steps time ratio."""
    by_seed: dict[int, dict[str, dict]] = {}
    for run in record["runs"]:
        by_seed.setdefault(run["seed"], {})[run["arm"]] = run
    by_seed = {s: runs for s, runs in sorted(by_seed.items()) if REFERENCE in runs}
    per_seed = {
        clock: {s: seed_times(_curves(runs, clock), REFERENCE) for s, runs in by_seed.items()}
        for clock in CLOCKS
    }
    arms = list(dict.fromkeys(a for runs in by_seed.values() for a in runs))
    summary: dict[str, Any] = {}
    for arm in arms:
        seeds = [s for s in by_seed if arm in by_seed[s]]
        summary[arm] = {
            clock: {t: summarize_arm([per_seed[clock][s][arm] for s in seeds], t) for t in TARGETS}
            for clock in CLOCKS
        }
        summary[arm]["equal_steps_pct"] = spread([equal_steps(_curves(by_seed[s], "train"), REFERENCE)[arm]
                                                  for s in seeds])  # fmt: skip
        summary[arm]["step_speedup"] = spread(
            [sum(by_seed[s][REFERENCE]["step_seconds"]) / sum(by_seed[s][arm]["step_seconds"]) for s in seeds]
        )
        summary[arm]["h200_step_speedup"] = spread(
            [_h200_steps(by_seed[s][REFERENCE]) / _h200_steps(by_seed[s][arm]) for s in seeds]
        )
    return {"per_seed": {c: {str(s): v for s, v in d.items()} for c, d in per_seed.items()}, "arms": summary}


def project_h200(run: dict[str, Any], cost: CostModel, probe_units: float) -> list[float]:
    """The run's evaluation points on the H200 clock: cumulative predicted step cost (probe included) in
    all-layer LoRA steps."""
    n = cost.num_layers
    unit = scheduled_step_cost(cost, list(range(n)), lowest=0, dropped=())
    per_step = [
        scheduled_step_cost(cost, run["selected_layers"], lowest=lo, dropped=dr) / unit
        for lo, dr in zip(run["lowest_block"], run["dropped_blocks"])
    ]
    start = probe_units if run["probe_seconds"] else 0.0
    return [start + sum(per_step[:s]) for s in run["steps"]]


# --------------------------------------------------------------------------- the command


def run_race(args: RaceArguments, *, log=print, command: list[str] | None = None) -> dict[str, Any]:
    """Race every arm of ``args`` once per seed; write summary.json, race.md and race.png to ``output_dir``."""
    out = Path(args.output_dir)
    previous = (
        resumable_record(out / "summary.json", args.fingerprint(), args.default_of, ("analysis",))
        if args.resume
        else None
    )
    if previous is None:
        out = check_output_dir(args.output_dir, overwrite=args.overwrite_output_dir, create=False)
    say = (lambda *a: None) if args.quiet else log
    base, tokenizer, device = load_base(args)
    rows, heldout, data = load_race_task(args, tokenizer)
    if not rows or not heldout:
        raise ValueError(
            f"race needs training and held-out rows; after tokenizing, {len(rows)} training and {len(heldout)} "
            f"held-out rows are left (raise --max_length or --test_limit)."
        )
    record: dict[str, Any] = previous or {
        "settings": args.fingerprint(),
        "model": args.model or "embedded SmolLM2-135M-Instruct",
        "data": data | {"train_rows": len(rows), "heldout_rows": len(heldout)},
        "num_layers": find_blocks(base).num_layers,
        "hardware": hardware(device),
        "versions": versions(),
        "command": command,
        "timing": "round-robin: every arm's step t timed where it runs, within seconds of the others' step t; "
        "evaluation excluded; probe-driven arms start at the probe's time",
        "runs": [],
        "cpu_seconds": 0.0,
        "wall_seconds": 0.0,
    }
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if record.get("base_loss") is None:
        record["base_loss"] = mean_loss(base, heldout, batch_size=args.eval_batch_size, pad_token_id=pad)
    targeted = any(race_arm(a).target for a in args.arms)
    if targeted and record.get("machine_cost") is None:
        say(f"calibrating the cost model on this machine ({args.batch_size} x {args.max_length} tokens) ...")
        config = dataclasses.replace(args.config(args.seeds[0]), calibrate_batch_size=args.batch_size,
                                     calibrate_seq_len=args.max_length)  # fmt: skip
        record["machine_cost"] = dataclasses.asdict(machine_cost(base, config))
    cost = CostModel(**record["machine_cost"]) if record.get("machine_cost") else None
    h200 = planned_cost(base, args.config(args.seeds[0]), batch_size=args.batch_size, seq_len=args.max_length)
    record["h200_cost"] = dataclasses.asdict(h200)
    # on the H200 clock the probe is taken as probe_batches all-layer steps (an estimate; see docs/benchmarks.md)
    probe_units = float(args.probe_batches)
    for seed in args.seeds:
        done = {r["arm"] for r in record["runs"] if r["seed"] == seed}
        if set(args.arms) <= done:
            say(f"seed {seed}: kept from the earlier run")
            continue
        wall, cpu = time.perf_counter(), time.process_time()
        runs = race_seed(base, tokenizer, rows, heldout, args, seed, cost, record["base_loss"], say)
        record["runs"] = [r for r in record["runs"] if r["seed"] != seed] + runs
        record["wall_seconds"] += time.perf_counter() - wall
        record["cpu_seconds"] += time.process_time() - cpu
        for run in record["runs"]:
            run["h200_units"] = project_h200(run, h200, probe_units)
        record["analysis"] = analyse(record)
        _write(out, record)
    for run in record["runs"]:
        run["h200_units"] = project_h200(run, h200, probe_units)
    record["analysis"] = analyse(record)
    _write(out, record)
    plot_race(record, out / "race.png")
    return record | {"table": markdown_table(record), "files": list(FILES), "output_dir": str(out)}


def _write(out: Path, record: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "summary.json", json.dumps(record, indent=1))
    atomic_write_text(out / "race.md", markdown_report(record))


# --------------------------------------------------------------------------- tables and the plot


def _speed(s: dict[str, Any]) -> str:
    if s.get("mean") is not None:
        se = f" +- {s['se']:.2f}" if s.get("se") is not None else ""
        return f"{s['mean']:.2f}x{se}" + (" *" if s.get("faster") else "")
    if s.get("reached"):
        return f"{s['reached']}/{s['seeds']} seeds"
    bound = f" (< {s['bound']:.2f}x)" if s.get("bound") else ""
    return f"not reached{bound}"


def _pct(s: dict[str, Any]) -> str:
    if s.get("mean") is None:
        return ""
    sd = f" +- {s['sd']:.1f}" if s.get("sd") is not None else ""
    return f"{s['mean']:+.1f}%{sd}"


def markdown_table(record: dict[str, Any], clock: str = "wall") -> str:
    """Per arm: time-to-target speedups over lora-all on ``clock`` (mean +- se over seeds; * = faster beyond
    2 se), the step-time speedup at equal steps, and the held-out loss gap at equal steps."""
    arms = record.get("analysis", {}).get("arms", {})
    header = ["arm", "to final loss", "to 95%", "to 90%", "time per step", "loss at equal steps"]
    rows = [
        [
            name,
            *(_speed(a[clock][t]) for t in TARGETS),
            _ratio(a["h200_step_speedup" if clock == "h200" else "step_speedup"]),
            _pct(a["equal_steps_pct"]),
        ]
        for name, a in arms.items()
    ]
    return render_table(header, rows)


def _ratio(s: dict[str, Any]) -> str:
    return f"{s['mean']:.2f}x" if s.get("mean") is not None else ""


def markdown_report(record: dict[str, Any]) -> str:
    seeds = sorted({r["seed"] for r in record["runs"]})
    s = record["settings"]
    lines = [
        f"# Time to target: {record['model']} on {record['data']['name']}",
        "",
        f"{s['steps']} steps of {s['batch_size']} x {s['max_length']} tokens, lr {s['learning_rate']}, LoRA r={s['r']}, "
        f"held-out loss on {record['data'].get('heldout_rows')} rows every {s['eval_every']} steps; seeds {seeds}.",
        f"Timing: {record['timing']}. Machine: {record['hardware'].get('cpu')} ({record['hardware'].get('torch_threads')} "
        f"threads); {record['wall_seconds'] / 60:.1f} min wall, {record['cpu_seconds'] / 60:.1f} min CPU.",
        "",
        "Speedup = lora-all's training time to the target / the arm's (probe included), mean +- standard error "
        "over seeds; * marks an arm faster beyond 2 standard errors. Targets: lora-all's final held-out loss, and "
        "95% / 90% of its total improvement. Time per step: lora-all's training time over the arm's for the same "
        "steps. Loss at equal steps: final held-out loss vs lora-all's, in percent.",
        "",
    ]
    if record.get("analysis"):
        lines += [
            "## Measured: training time on this machine, the probe's time included",
            "",
            markdown_table(record, "wall"),
            "",
            "## Measured: training time alone (the probe not counted)",
            "",
            markdown_table(record, "train"),
            "",
            "## Projected to an H200 (not measured)",
            "",
            "Every step's cost by the shipped H200 cost model (FLOPs with its LoRA factor) for the blocks whose "
            f"backward ran in that step; the probe counted as {record['settings']['probe_batches']} all-layer steps. "
            "A projection until a GPU run replaces it.",
            "",
            markdown_table(record, "h200"),
            "",
        ]
    else:
        lines += ["(no finished seed yet)", ""]
    lines += ["## Runs", ""]
    for run in sorted(record["runs"], key=lambda r: (r["seed"], r["arm"])):
        extra = ""
        if run.get("schedule", {}).get("kind") == "freeze":
            extra = f"; froze {run['schedule']['frozen_blocks'] or 'nothing'}"
        elif run.get("schedule", {}).get("kind") == "drop":
            extra = f"; dropped {sum(map(len, run['dropped_blocks'])) / len(run['dropped_blocks']):.1f} blocks a step"
        lines.append(
            f"- {run['arm']} seed {run['seed']}: layers {layer_spans(run['selected_layers'], ', ')}, median step "
            f"{run['median_step_seconds']:.3f} s, final held-out {run['heldout_loss'][-1]:.4f}{extra}"
        )
    return "\n".join(lines) + "\n"


def plot_race(record: dict[str, Any], path: str | Path) -> None:
    """Held-out loss against training seconds, one line per arm (mean over seeds, seeds' range shaded), and
    against steps; lora-all's final loss dashed."""
    fig = new_figure((12, 4.5))
    fig.set_layout_engine("constrained")
    ax_t, ax_s = fig.subplots(1, 2)
    arms = list(dict.fromkeys(r["arm"] for r in record["runs"]))
    for i, arm in enumerate(arms):
        runs = [r for r in record["runs"] if r["arm"] == arm]
        color = f"C{i}"
        grid = common_grid(
            [([r["probe_seconds"] + t for t in r["train_seconds"]], r["heldout_loss"]) for r in runs]
        )
        ax_t.plot(grid["seconds"], grid["mean"], color=color, label=arm)
        ax_t.fill_between(grid["seconds"], grid["low"], grid["high"], color=color, alpha=0.2)
        steps = runs[0]["steps"]
        mean = [statistics.fmean(r["heldout_loss"][j] for r in runs) for j in range(len(steps))]
        ax_s.plot(steps, mean, color=color, label=arm)
    finals = [r["heldout_loss"][-1] for r in record["runs"] if r["arm"] == REFERENCE]
    for ax in (ax_t, ax_s):
        ax.axhline(statistics.fmean(finals), color="grey", linestyle="--", linewidth=0.8)
        ax.set_ylabel("held-out loss")
    ax_t.set_xlabel("training seconds (probe included, evaluation excluded)")
    ax_s.set_xlabel("optimizer steps")
    ax_t.legend(fontsize=8)
    fig.suptitle(
        f"{record['model']} on {record['data']['name']}: time to all-layer LoRA's final loss (dashed)"
    )
    save_png(fig, path)


__all__ = ["CLOCKS", "DEFAULT_ARMS", "RaceArguments", "RaceArm", "analyse", "race_arm", "run_race"]
