"""Side-by-side speed benchmark: all-layer LoRA against aletheia's layer selections.

One process, one copy of the model. The probe runs once (timed; a real model on task data,
``probe_data``, so that the selections are those a real run makes; random weights on random
tokens); then every *arm* (a way of
choosing the adapted layers) is trained for a few steps with and without activation
checkpointing, in interleaved rounds (``timing.time_arms``), so that slow drift of the machine hits every arm alike:

    round 1: lora-all, top, depth-aware, random, last   (warm-up steps first, then timed steps)
    round 2: top, depth-aware, random, last, lora-all   (the order rotates each round)
    ...

Each arm wraps the base model with ``peft.get_peft_model`` and ``unload()``\\ s it afterwards.

* ``lora-all``: LoRA on every block, as users run it today: plain ``get_peft_model``; with
  checkpointing, ``gradient_checkpointing_enable()`` + ``enable_input_require_grads()``.
* ``top`` / ``depth-aware`` / ``random`` / ``last``: ``select_layers(scores, top_pct,
  strategy=arm)`` at the same layer budget, trained with :func:`truncate_backward` (no
  backward below the lowest adapted block; with checkpointing only the blocks from there up
  are checkpointed, non-reentrantly).

Reported per arm: median step time (forward + backward + AdamW step), the measured speedup
(median of ``lora-all`` / median of the arm, same checkpointing setting), the speedup the
cost model predicts (:func:`aletheia_lora.costmodel.predict_speedup`), the end-to-end
speedup over ``e2e_steps`` steps with the probe's time charged to the arms that need it

    e2e = e2e_steps * t_lora_all / (probe_seconds + e2e_steps * t_arm)

and peak GPU memory. Files: ``bench.json`` (everything, all step times included),
``bench.md`` (the table) and ``bench.png`` (measured vs predicted speedups).
"""

from __future__ import annotations

import ctypes
import dataclasses
import datetime
import gc as garbage
import json
import os
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .architecture import find_blocks
from .costmodel import CostModel, cost_model, predict_speedup
from .data import prepare_data
from .io import atomic_write_text
from .models import load_model, quantize_linears, random_model, resolve_device, resolve_dtype
from .plan import run_probe, select
from .presets import get_preset, preset_names
from .report import new_figure, render_table, save_png, significant
from .runs import check_output_dir, default_output_dir, hardware, max_rss, versions
from .scores import LayerScores
from .settings import (
    SCORES,
    AletheiaConfig,
    BudgetSettings,
    DataSettings,
    ModelSettings,
    OutputDirSettings,
    at_least,
)
from .timing import TimedArm, calibrate_by_timing, random_tokens, synchronize, time_arms

ARMS = ("lora-all", "top", "depth-aware", "random", "last")
BASELINE = "lora-all"
# Strategies that never read the probe's scores: in a real run they need no probe.
SCORE_FREE = frozenset({"random", "last"})
RANDOM_TOKENS = "random"  # --probe_data value: probe on random tokens
CHECKPOINTING = {"both": (False, True), "off": (False,), "on": (True,)}
FILES = ("bench.json", "bench.md", "bench.png")


@dataclass(kw_only=True)
class BenchArguments(ModelSettings, BudgetSettings, OutputDirSettings):
    """Settings of ``aletheia-lora bench``: the shared model, budget and output groups, and its own.
    Every field is a flag of the same name."""

    random_init: str | None = field(
        default=None,
        metadata={"help": f"Random weights with the real shapes of a preset: {', '.join(preset_names())}."},
    )
    num_layers: int | None = field(
        default=None,
        metadata={"help": "With --random_init: build this many blocks instead of the published count."},
    )
    device: str | None = field(
        default=None, metadata={"help": "Where to run (default: cuda if available, else cpu)."}
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "Attention kernel, e.g. sdpa, eager (default: the transformers default)."},
    )
    batch_size: int = field(default=4, metadata={"help": "Sequences per training step."})
    seq_len: int = field(default=1024, metadata={"help": "Tokens per sequence."})
    steps: int = field(default=10, metadata={"help": "Timed steps per arm and round."})
    warmup: int = field(default=3, metadata={"help": "Untimed steps per arm before its first timed round."})
    rounds: int = field(default=3, metadata={"help": "Interleaved rounds over all arms."})
    r: int = field(default=16, metadata={"help": "LoRA rank (alpha = 2 r) on every adaptable weight."})
    arms: list[str] = field(
        default_factory=lambda: list(ARMS),
        metadata={"help": "Arms to run; lora-all (the baseline) is always included.", "choices": list(ARMS)},
    )
    gradient_checkpointing: str = field(
        default="both", metadata={"help": "Run the arms with checkpointing on, off, or both.", "choices": list(CHECKPOINTING)}
    )  # fmt: skip
    probe_batches: int = field(default=5, metadata={"help": "Batches of the (timed) gradient probe."})
    score: str = field(
        default="grad-norm",
        metadata={"help": "The probe signal top and depth-aware rank by (see train --help and docs/method.md).",
                  "choices": list(SCORES)},
    )  # fmt: skip
    probe_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Sequences per probe batch (default: train's default, 1, on task data; batch_size on "
            "random tokens)."
        },
    )
    probe_data: str | None = field(
        default=None,
        metadata={"help": "What a real model is probed on: task data as train's --data takes it (default: "
                  "'embedded', the embedded arithmetic task, as train uses by default), so the selections are "
                  "the ones train would make; 'random' for random tokens. Random weights are always probed on "
                  "random tokens. Steps are timed on random tokens either way."},
    )  # fmt: skip
    calibrate: bool = field(
        default=False,
        metadata={"help": "First time three other selections (every_other, bottom_quarter, top_quarter) on "
                  "this machine and fit the cost model to them (costmodel.calibrate); depth-aware and the "
                  "predictions then use the calibrated model."},
    )  # fmt: skip
    e2e_steps: int = field(
        default=200, metadata={"help": "Run length for the end-to-end speedup incl. the probe."}
    )
    seed: int = field(
        default=0, metadata={"help": "Seeds the random weights, tokens, selections and LoRA init."}
    )

    def _check(self) -> None:
        if self.model is not None and self.random_init is not None:
            raise ValueError(
                f"model={self.model!r} and random_init={self.random_init!r}; pass one of them (a real model, "
                f"or random weights with a preset's shapes)."
            )
        if self.num_layers is not None and self.random_init is None:
            raise ValueError(
                f"num_layers={self.num_layers} applies to --random_init only; a real model keeps its blocks."
            )
        if self.probe_data not in (None, RANDOM_TOKENS) and self.random_init is not None:
            raise ValueError(
                f"probe_data={self.probe_data!r} with random_init={self.random_init!r}: random weights give "
                f"task data no meaning (and have no tokenizer); drop --probe_data, or use --model."
            )
        if self.random_init is not None:  # an unknown preset fails before anything is built
            get_preset(self.random_init)
        at_least(self, 1, "batch_size", "seq_len", "steps", "rounds", "r", "probe_batches", "e2e_steps")
        if self.seq_len < 2:
            raise ValueError(f"seq_len={self.seq_len}; it must be >= 2 (one token predicts the next).")
        at_least(self, 0, "warmup")
        at_least(self, 1, "probe_batch_size", unset_ok=True)
        if self.score not in SCORES:
            raise ValueError(f"score={self.score!r}; use one of {list(SCORES)}.")
        if self.gradient_checkpointing not in CHECKPOINTING:
            raise ValueError(
                f"gradient_checkpointing={self.gradient_checkpointing!r}; use one of {list(CHECKPOINTING)}."
            )
        if isinstance(self.arms, str):
            self.arms = [self.arms]
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown:
            raise ValueError(f"unknown arms {unknown}; choose from {list(ARMS)}.")
        self.arms = [BASELINE] + [a for a in ARMS if a in self.arms and a != BASELINE]


# --------------------------------------------------------------------------- model


def build_model(
    args: BenchArguments, device: torch.device, dtype: torch.dtype, *, quantized: bool = True
) -> tuple[nn.Module, dict, Any]:
    """The model under test, a description of it, and its tokenizer (``None`` for random weights).

    ``random_init``: :func:`aletheia_lora.models.random_model` (seeded by ``args.seed``);
    otherwise :func:`aletheia_lora.models.load_model`. With ``--load_in_4bit``/``--load_in_8bit`` (and
    ``quantized``) the linear weights are bitsandbytes 4/8-bit (random weights: quantized in place).
    """
    quantization = args.quantization_kwargs() if quantized else {}
    if args.random_init is not None:
        preset = get_preset(args.random_init)
        model = random_model(preset.name, device=device, dtype=dtype, seed=args.seed, num_layers=args.num_layers,
                             attn_implementation=args.attn_implementation)  # fmt: skip
        if quantization:
            model = quantize_linears(model, device=device, **quantization)
        info = {"source": "random_init", "preset": preset.name, "shapes_of": preset.hub_id}
        tokenizer = None
    else:
        model, tokenizer = load_model(
            args.model, dtype=dtype, device=device, trust_remote_code=args.trust_remote_code, **quantization
        )
        if args.attn_implementation:
            model.set_attn_implementation(args.attn_implementation)
        info = {"source": "pretrained", "model": args.model or "embedded SmolLM2-135M-Instruct"}
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False
    info.update(
        {
            "class": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()),
            "dtype": str(dtype).replace("torch.", ""),
            "device": str(device),
            "weights": weights_label(args, dtype, quantized=quantized),
        }
    )
    return model, info, tokenizer


def weights_label(args: BenchArguments, dtype: torch.dtype, *, quantized: bool = True) -> str:
    """How the base weights are held: ``"4-bit nf4 (double quant, compute float32)"``, ``"8-bit"`` or the dtype."""
    kw = args.quantization_kwargs() if quantized else {}
    if not kw:
        return str(dtype).replace("torch.", "")
    if kw["quantization"] == "8bit":
        return "8-bit (bitsandbytes int8)"
    compute = kw["bnb_4bit_compute_dtype"] or ("bfloat16" if torch.cuda.is_available() else "float32")
    double = ", double quant" if kw["bnb_4bit_use_double_quant"] else ""
    return f"4-bit {kw['bnb_4bit_quant_type']}{double}, compute {compute}"


# --------------------------------------------------------------------------- peak memory


def _proc_status(field_name: str) -> int | None:
    """A ``/proc/self/status`` memory field (``VmHWM``, ``VmRSS``) in bytes, or ``None`` off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory of a loaded base and its training steps, net of what was resident before the load.

    Made before the load (it reads the baseline); :meth:`reset` after the load, so that the load's own
    transient spike (e.g. random float weights before quantization) is left out while the loaded
    weights stay counted; :meth:`read` after the steps. GPU: ``torch.cuda.max_memory_allocated`` less
    the allocated memory before the load (``time_arms`` resets the peak per arm, so the steps' peaks
    are its arms' ``peak_memory_bytes``). CPU (Linux): the process's peak resident set (``VmHWM``,
    reset through ``/proc/self/clear_refs``) less the resident set before the load. ``None`` where
    neither can be read.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        garbage.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            self.start: int | None = torch.cuda.memory_allocated(device)
            self.measure = (
                "torch.cuda.max_memory_allocated during the steps, less the memory allocated before the load"
            )
        else:
            _return_freed_memory()
            self.start = _proc_status("VmRSS")
            self.measure = "peak resident set (VmHWM) during the steps, less the resident set before the load"

    def reset(self) -> None:
        garbage.collect()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := the current resident set
        except OSError:
            self.start = None

    def read(self, arm_peaks: list[int | None] = ()) -> int | None:
        if self.start is None:
            return None
        if self.device.type == "cuda":
            return (
                max([torch.cuda.max_memory_allocated(self.device), *(p or 0 for p in arm_peaks)]) - self.start
            )
        peak = _proc_status("VmHWM")
        return None if peak is None else peak - self.start


def _return_freed_memory() -> None:
    """Hand memory freed by a previous base back to the OS (glibc ``malloc_trim``), so that it is not
    resident at the next base's baseline and reused unseen; a no-op off glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def compare_weights(
    args: BenchArguments, device: torch.device, dtype: torch.dtype, layers: list[int], input_ids, say
) -> list[dict[str, Any]]:
    """``--load_in_4bit``/``8bit``: the quantized base against the ``dtype`` base, each loaded afresh and
    timed alone (lora-all and the top selection ``layers``, no checkpointing, one round of ``steps``
    steps after ``warmup``), with the peak memory of the loaded base and its steps (:class:`PeakMemory`).
    The quantized base goes first, so any memory the allocator keeps from it can only flatter the other."""
    out = []
    for quantized in (True, False):
        memory = PeakMemory(device)
        model, info, _ = build_model(args, device, dtype, quantized=quantized)
        if getattr(model, "config", None) is not None:
            model.config.use_cache = False
        memory.reset()
        num_layers = find_blocks(model).num_layers
        arms = [
            TimedArm(BASELINE, False, list(range(num_layers)), truncate=False),
            TimedArm("top", False, layers),
        ]
        time_arms(model, arms, input_ids, lora_kwargs=lora_kwargs(args), steps=args.steps, warmup=args.warmup,
                  rounds=1, seed=args.seed)  # fmt: skip
        synchronize(device)
        peak = memory.read([arm.peak_memory_bytes for arm in arms])
        del model
        for arm in arms:
            out.append({"weights": info["weights"], "arm": arm.arm, "layers": arm.layers, "median_ms": 1000 * arm.median_seconds,
                        "peak_memory_bytes": peak, "memory_measure": memory.measure})  # fmt: skip
            say(f"weights {info['weights']:<40} {arm.arm:<10} {1000 * arm.median_seconds:9.1f} ms/step, "
                f"peak memory {_mib(peak)}")  # fmt: skip
    garbage.collect()
    return out


def _mib(n: int | None) -> str:
    return "—" if n is None else f"{n / 2**20:,.0f} MiB"


def weights_table(rows: list[dict[str, Any]]) -> str:
    """The quantized-vs-float comparison as a markdown table."""
    header = ("weights", "arm", "layers", "ms/step (median)", "peak memory (base + steps)")
    lines = [(r["weights"], r["arm"], str(len(r["layers"])), significant(r["median_ms"], 3), _mib(r["peak_memory_bytes"]))
             for r in rows]  # fmt: skip
    return render_table(header, lines)


# --------------------------------------------------------------------------- probe and selections


def probe_source(args: BenchArguments) -> str:
    """``"random"`` (random tokens), ``"embedded"`` (the embedded task) or the data argument."""
    if args.random_init is not None:
        return RANDOM_TOKENS
    return args.probe_data or "embedded"


def probe_batch_size(args: BenchArguments) -> int:
    """Rows per probe batch: as given; else train's default on task data, the bench shape on random tokens."""
    if args.probe_batch_size is not None:
        return args.probe_batch_size
    if probe_source(args) == RANDOM_TOKENS:
        return args.batch_size
    return AletheiaConfig().probe_batch_size


def probe_data_label(args: BenchArguments) -> str:
    source = probe_source(args)
    return {RANDOM_TOKENS: "random tokens", "embedded": "the embedded arithmetic task"}.get(source, source)


def probe_rows(args: BenchArguments, tokenizer, vocab: int) -> list[Any]:
    """What the probe reads: the tokenized task data (cut at ``seq_len``), or random tokens."""
    pbs = probe_batch_size(args)
    source = probe_source(args)
    if source == RANDOM_TOKENS:
        g = torch.Generator().manual_seed(args.seed + 1)
        return [{"input_ids": torch.randint(0, vocab, (args.seq_len,), generator=g).tolist()}
                for _ in range(args.probe_batches * pbs)]  # fmt: skip
    data = DataSettings(
        data=None if source == "embedded" else source, max_length=args.seq_len, max_eval_samples=1
    )
    return prepare_data(data, tokenizer, args.seed).train


def probe_config(args: BenchArguments, strategy: str = "top") -> AletheiaConfig:
    """The probe and selection settings of one arm: the bench's budget, probe and seed."""
    return AletheiaConfig(
        strategy=strategy,
        top_pct=args.top_pct,
        top_k=args.top_k,
        target_speedup=args.target_speedup if strategy == "depth-aware" else None,
        probe_batches=args.probe_batches,
        probe_batch_size=probe_batch_size(args),
        score=args.score,
        seed=args.seed,
    )


def _probe(
    model, rows: list[Any], args: BenchArguments, device: torch.device
) -> tuple[LayerScores, float, float]:
    """Scores from a timed probe on ``rows``; (scores, seconds, warm-up seconds)."""
    config = probe_config(args)
    # first kernels, allocator growth: not part of the probe's cost
    _, warm = run_probe(model, rows[: config.probe_batch_size], dataclasses.replace(config, probe_batches=1),
                        device=device)  # fmt: skip
    synchronize(device)
    scores, seconds = run_probe(model, rows, config, device=device)
    synchronize(device)
    return scores, seconds, warm


def arm_rows(
    model, scores: LayerScores, args: BenchArguments, num_layers: int, cost: CostModel
) -> list[TimedArm]:
    """The (arm, checkpointing) rows with their selections and their speedups predicted by ``cost``."""
    rows = []
    for gc in CHECKPOINTING[args.gradient_checkpointing]:
        for arm in args.arms:
            if arm == BASELINE:
                layers, predicted = list(range(num_layers)), 1.0
            else:
                layers = select(
                    scores, probe_config(args, arm), model=model, cost=cost, gradient_checkpointing=gc
                )
                predicted = predict_speedup(model, layers, batch_size=args.batch_size, seq_len=args.seq_len,
                                            gradient_checkpointing=gc, r=args.r, cost=cost)  # fmt: skip
            rows.append(
                TimedArm(arm, gc, [int(i) for i in layers], float(predicted), truncate=arm != BASELINE)
            )
    return rows


def lora_kwargs(args: BenchArguments) -> dict[str, Any]:
    """LoRA of every timed arm: rank ``r``, alpha ``2 r``, on every adaptable weight."""
    return {"r": args.r, "lora_alpha": 2 * args.r}


# --------------------------------------------------------------------------- the run


def _eta(args: BenchArguments, num_rows: int) -> Callable[[float], str]:
    """How long the rest of a timing pass takes if every step is as long as the first row's."""
    left = (num_rows - 1) * (args.warmup + args.steps) + (args.rounds - 1) * num_rows * args.steps
    return lambda step_seconds: (
        f"  ({num_rows} timed rows x {args.rounds} rounds: about {step_seconds * left / 60:.1f} min to go "
        f"at this step time; lower --seq_len/--steps/--rounds for a quicker look)"
    )


def _time(model, rows: list[TimedArm], args: BenchArguments, input_ids: torch.Tensor, log) -> None:
    time_arms(model, rows, input_ids, lora_kwargs=lora_kwargs(args), steps=args.steps, warmup=args.warmup,
              rounds=args.rounds, seed=args.seed, log=log, eta=_eta(args, len(rows)))  # fmt: skip


def _results(rows: list[TimedArm], probe_seconds: float, e2e_steps: int) -> list[dict[str, Any]]:
    base = {row.gradient_checkpointing: row.median_seconds for row in rows if row.arm == BASELINE}
    out = []
    for row in rows:
        t_all, t_arm = base[row.gradient_checkpointing], row.median_seconds
        charged = row.arm != BASELINE and row.arm not in SCORE_FREE
        round_medians = [statistics.median(steps) for steps in row.step_seconds]
        out.append(
            {
                "arm": row.arm,
                "gradient_checkpointing": row.gradient_checkpointing,
                "layers": row.layers,
                "num_layers_adapted": len(row.layers),
                "lowest_trained_layer": row.lowest_trained_layer,
                "trainable_params": row.trainable_params,
                "median_ms": 1000 * t_arm,
                "round_median_ms": [1000 * t for t in round_medians],
                "step_ms": [[1000 * t for t in steps] for steps in row.step_seconds],
                "measured_speedup": t_all / t_arm,
                "predicted_speedup": row.predicted_speedup,
                "e2e_speedup": 1.0
                if row.arm == BASELINE
                else e2e_steps * t_all / ((probe_seconds if charged else 0.0) + e2e_steps * t_arm),
                "probe_charged": charged,
                "checkpoint_kwargs": row.checkpoint_kwargs,
                "peak_memory_bytes": row.peak_memory_bytes,
            }
        )
    return out


def run_bench(
    args: BenchArguments | None = None,
    *,
    log: Callable[[str], Any] | None = print,
    command: list[str] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Run the benchmark; write ``bench.json``, ``bench.md`` and ``bench.png``; return the record.

    ``overrides`` replace fields of ``args`` (``run_bench(random_init="qwen2.5-0.5b", steps=3)``);
    ``log`` receives the progress lines (``None``: silent); ``command`` is recorded as the
    command line (default ``sys.argv``).
    The returned dict is what ``bench.json`` holds, plus ``table`` (the markdown table),
    ``output_dir`` and ``files``.
    """
    args = dataclasses.replace(args or BenchArguments(), **overrides)
    say = log or (lambda *a: None)
    if args.quiet:
        say = lambda *a: None  # noqa: E731
    out = check_output_dir(args.output_dir or default_output_dir("bench"), overwrite=args.overwrite_output_dir,
                           create=False)  # fmt: skip
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)

    started = datetime.datetime.now(datetime.timezone.utc)
    model, model_info, tokenizer = build_model(args, device, dtype)
    arch = find_blocks(model)
    model_info |= {"num_layers": arch.num_layers, "blocks_path": arch.blocks_path}
    vocab = model.get_input_embeddings().num_embeddings
    say(f"model: {model_info.get('preset') or model_info.get('model')} ({model_info['class']}, "
        f"{arch.num_layers} blocks, {model_info['parameters'] / 1e6:,.0f}M parameters, {model_info['dtype']}, {device})")  # fmt: skip

    scores, probe_seconds, probe_warmup = _probe(model, probe_rows(args, tokenizer, vocab), args, device)
    say(f"probe: {probe_seconds:.2f} s for {args.probe_batches} batches of "
        f"{probe_batch_size(args)} rows of {probe_data_label(args)}, at most {args.seq_len} tokens")  # fmt: skip
    input_ids = random_tokens(model, args.batch_size, args.seq_len, args.seed + 2)
    # one cost model at the bench's shape, for depth-aware's choice and for the predictions
    cost = cost_model(model, batch_size=args.batch_size, seq_len=args.seq_len, r=args.r)
    calibration_rows: list[TimedArm] = []
    if args.calibrate:
        cost, calibration_rows = calibrate_by_timing(
            model, cost, input_ids, lora_kwargs=lora_kwargs(args), checkpointing=CHECKPOINTING[args.gradient_checkpointing],
            steps=args.steps, warmup=args.warmup, rounds=args.rounds, seed=args.seed, log=say,
        )  # fmt: skip
    rows = arm_rows(model, scores, args, arch.num_layers, cost)
    _time(model, rows, args, input_ids, say)

    results = _results(rows, probe_seconds, args.e2e_steps)
    weights: list[dict[str, Any]] = []
    if args.quantization_kwargs():  # the same steps on the float base, each base loaded alone
        top = next((row.layers for row in rows if row.arm == "top"), None)
        top = top if top is not None else select(scores, probe_config(args), model=model, cost=cost)
        del model, arch  # the block stack too: the comparison loads each base alone
        say("quantized against float weights: each base loaded afresh, lora-all and top timed alone ...")
        weights = compare_weights(args, device, dtype, top, input_ids, say)
    record: dict[str, Any] = {
        "date": started.isoformat(timespec="seconds"),
        "command": list(command if command is not None else sys.argv),
        "settings": dataclasses.asdict(args) | {"output_dir": str(out)},
        "model": model_info,
        "hardware": hardware(device) | {"process_max_rss_bytes": max_rss()},
        "versions": versions(),
        "timing": {
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "warmup_steps": args.warmup,
            "steps_per_round": args.steps,
            "rounds": args.rounds,
            "step": "forward + backward + AdamW step, device-synchronised",
            "lora": {"r": args.r, "lora_alpha": 2 * args.r},
            "checkpointing_baseline": "activation_checkpointing_enable() (library default) + enable_input_require_grads()",
            "checkpointing_arms": "truncate_backward: non-reentrant from the lowest adapted block up, no_grad below",
        },
        "probe": {
            "seconds": probe_seconds,
            "warmup_seconds": probe_warmup,
            "batches": args.probe_batches,
            "batch_size": probe_batch_size(args),
            "seq_len": args.seq_len,
            "data": probe_data_label(args),
            "scores": scores.to_dict(),
        },
        "cost_model": dataclasses.asdict(cost),
        "calibration": [
            {
                "selection": row.arm.split(":", 1)[1],
                "gradient_checkpointing": row.gradient_checkpointing,
                "layers": row.layers,
                "median_ms": 1000 * row.median_seconds,
            }
            for row in calibration_rows
        ],  # fmt: skip
        "e2e_steps": args.e2e_steps,
        "results": results,
        "weights_comparison": weights,
    }
    table = markdown_table(results, args.e2e_steps)
    if weights:
        table += (f"\n\nQuantized against float base weights, each base loaded alone (no checkpointing; peak "
                  f"memory: {weights[0]['memory_measure']}):\n\n{weights_table(weights)}")  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "bench.json", json.dumps(record, indent=1, default=str) + "\n")
    atomic_write_text(out / "bench.md", markdown_report(record, table))
    plot_speedups(results, out / "bench.png", title=_title(record))
    return record | {"table": table, "output_dir": str(out), "files": list(FILES)}


# --------------------------------------------------------------------------- output


def _x(value: float) -> str:
    return f"{value:.2f}x"


def _memory(n: int | None) -> str:
    return "—" if n is None else f"{n / 2**30:.1f} GiB"


def markdown_table(results: list[dict[str, Any]], e2e_steps: int) -> str:
    """The results as a markdown table, one row per arm and checkpointing setting."""
    header = (
        "arm",
        "checkpointing",
        "layers",
        "ms/step (median)",
        "speedup (measured)",
        "speedup (predicted)",
        f"e2e {e2e_steps} steps incl. probe",
        "peak memory",
    )
    total = max(r["num_layers_adapted"] for r in results)
    lines = []
    for r in results:
        layers = f"{r['num_layers_adapted']} of {total}"
        if r["arm"] != BASELINE and r["layers"]:
            layers += f", from {min(r['layers'])}"
        e2e = _x(r["e2e_speedup"]) + ("" if r["probe_charged"] or r["arm"] == BASELINE else " (no probe)")
        lines.append(
            (
                r["arm"],
                "on" if r["gradient_checkpointing"] else "off",
                layers,
                significant(r["median_ms"], 3),
                _x(r["measured_speedup"]),
                _x(r["predicted_speedup"]),
                e2e,
                _memory(r["peak_memory_bytes"]),
            )
        )
    return render_table(header, lines)


def _title(record: dict[str, Any]) -> str:
    m, t = record["model"], record["timing"]
    name = m.get("preset") or m.get("model") or m["class"]
    device = record["hardware"].get("gpu") or record["hardware"]["cpu"]
    return (
        f"{name}, {m['num_layers']} blocks, {m['dtype']}, batch {t['batch_size']} x {t['seq_len']} — {device}"
    )


def _budget_note(record: dict[str, Any]) -> str:
    settings = record["settings"]
    budget = f"top_k={settings['top_k']}" if settings.get("top_k") else f"top_pct={settings['top_pct']:g}"
    note = f"layer budget {budget}"
    if settings.get("target_speedup"):
        note += (f"; depth-aware: the most score among selections predicted >= {settings['target_speedup']:g}x "
                 f"(the budget is a ceiling)")  # fmt: skip
    return note


def _cost_model_note(record: dict[str, Any]) -> str:
    calibration = record["cost_model"]["meta"].get("calibration")
    if not calibration:
        return "FLOP counts of the real shapes with the default LoRA factor (fitted on an H200); not calibrated here"
    names = sorted({c["selection"] for c in record.get("calibration", [])})
    return (
        f"calibrated in this run on {len(calibration['points'])} timed selections ({', '.join(names)}), none of "
        f"them an arm; largest fit error {calibration['max_relative_error']:.1%}"
    )


def markdown_report(record: dict[str, Any], table: str) -> str:
    m, t, p, hw, v = (
        record["model"],
        record["timing"],
        record["probe"],
        record["hardware"],
        record["versions"],
    )
    source = (
        f"random weights with the shapes of `{m['preset']}` ({m['shapes_of']})"
        if m["source"] == "random_init"
        else f"`{m['model']}`"
    )
    device = (
        f"{hw['gpu']} (CUDA {hw['cuda']})" if hw.get("gpu") else f"{hw['cpu']}, {hw['cpus_usable']} CPU cores"
    )
    base = next(r for r in record["results"] if r["arm"] == BASELINE)  # the first: no checkpointing if run
    lines = [
        f"# aletheia-lora bench: {_title(record)}",
        "",
        f"- model: {source}, {m['num_layers']} blocks, {m['parameters']:,} parameters, {m['dtype']}"
        + (f", weights {m['weights']}" if m.get("weights", m["dtype"]) != m["dtype"] else ""),
        f"- machine: {device}; torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}",
        f"- date: {record['date']}",
        f"- command: `{' '.join(record['command'])}`",
        f"- step: {t['step']}; batch {t['batch_size']} x {t['seq_len']} tokens; LoRA r={t['lora']['r']} on every "
        f"adaptable weight of the adapted blocks; {t['warmup_steps']} warm-up steps per arm, then "
        f"{t['rounds']} interleaved rounds of {t['steps_per_round']} timed steps; median over all timed steps",
        f"- probe: {p['seconds']:.2f} s ({p['batches']} batches of {p['batch_size']} rows of "
        f"{p.get('data', 'random tokens')}, at most {p['seq_len']} tokens), "
        f"{p['seconds'] / (base['median_ms'] / 1000):.1f} lora-all steps",
        f"- selection: {_budget_note(record)}",
        f"- cost model: {_cost_model_note(record)}",
        "",
        table,
        "",
        "Speedups are against `lora-all` at the same checkpointing setting, measured side by side in this run. "
        f"`e2e` = {record['e2e_steps']} x t(lora-all) / (probe + {record['e2e_steps']} x t(arm)); "
        "`random` and `last` need no probe, so none is charged to them.",
        f"Checkpointing on: `lora-all` uses {t['checkpointing_baseline']}; the selection arms use "
        f"{t['checkpointing_arms']}.",
        "",
    ]
    return "\n".join(lines)


def plot_speedups(
    results: list[dict[str, Any]], path: str | os.PathLike, *, title: str | None = None
) -> None:
    """Bar chart of measured vs predicted speedup (and e2e) per arm and checkpointing setting."""
    labels = [f"{r['arm']}\n{'ckpt' if r['gradient_checkpointing'] else 'no ckpt'}" for r in results]
    series = (
        ("measured", "measured_speedup", "#4C72B0"),
        ("predicted", "predicted_speedup", "#DD8452"),
        ("e2e incl. probe", "e2e_speedup", "#55A868"),
    )
    fig = new_figure((max(7.0, 1.0 + 0.9 * len(results)), 4.5))
    ax = fig.add_subplot()
    width = 0.8 / len(series)
    for k, (name, key, colour) in enumerate(series):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(results))]
        ax.bar(xs, [r[key] for r in results], width=width, label=name, color=colour)
    ax.axhline(1.0, color="#444444", lw=0.8, ls="--")
    ax.set_xticks(range(len(results)))
    ax.set_xticklabels(labels, fontsize="small")
    ax.set_ylabel("speedup vs lora-all (same checkpointing)")
    ax.set_title(title or "aletheia-lora bench", fontsize="medium")
    ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    save_png(fig, path)
