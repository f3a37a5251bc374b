"""Side-by-side speed benchmark: all-layer LoRA against aletheia's layer selections.

One process, one copy of the model. The probe runs once (timed; a real model on task data,
``probe_data``, so that the selections are those a real run makes; random weights on random
tokens); then every *arm* (a way of
choosing the adapted layers) is trained for a few steps with and without activation
checkpointing, in interleaved rounds, so that slow drift of the machine hits every arm alike:

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

import contextlib
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .presets import preset_names

ARMS = ("lora-all", "top", "depth-aware", "random", "last")
BASELINE = "lora-all"
# Strategies that never read the probe's scores: in a real run they need no probe.
SCORE_FREE = frozenset({"random", "last"})
RANDOM_TOKENS = "random"  # --probe_data value: probe on random tokens
CHECKPOINTING = {"both": (False, True), "off": (False,), "on": (True,)}
# Timed for --calibrate: they differ in lowest layer and in count (so forward, backward and LoRA
# costs separate) and none of them is an arm, so the arms' predictions stay out-of-sample.
CALIBRATION = ("every_other", "bottom_quarter", "top_quarter")
DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}
FILES = ("bench.json", "bench.md", "bench.png")


@dataclass
class BenchArguments:
    """Settings of ``aletheia-lora bench``. Every field is a flag of the same name."""

    model: str | None = field(
        default=None,
        metadata={"help": "Hub id or local folder of a real model (default: the embedded SmolLM2-135M-Instruct, "
                  "unless --random_init is given)."},
    )  # fmt: skip
    random_init: str | None = field(
        default=None,
        metadata={"help": f"Random weights with the real shapes of a preset: {', '.join(preset_names())}."},
    )
    num_layers: int | None = field(
        default=None,
        metadata={"help": "With --random_init: build this many blocks instead of the published count."},
    )
    dtype: str | None = field(
        default=None,
        metadata={"help": "Weight dtype: bf16, fp16 or fp32 (default: bf16 on a GPU, fp32 on a CPU)."},
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
    top_pct: float = field(default=50, metadata={"help": "Layer budget of the selection arms, in percent."})
    top_k: int | None = field(
        default=None, metadata={"help": "Layer budget as an exact count (overrides top_pct)."}
    )
    target_speedup: float | None = field(
        default=None,
        metadata={"help": "depth-aware arm only: pick the most score among selections predicted to be at "
                  "least this much faster than lora-all (top_pct/top_k then cap the layer count)."},
    )  # fmt: skip
    arms: list[str] = field(
        default_factory=lambda: list(ARMS),
        metadata={"help": "Arms to run; lora-all (the baseline) is always included.", "choices": list(ARMS)},
    )
    gradient_checkpointing: str = field(
        default="both", metadata={"help": "Run the arms with checkpointing on, off, or both.", "choices": list(CHECKPOINTING)}
    )  # fmt: skip
    probe_batches: int = field(default=5, metadata={"help": "Batches of the (timed) gradient probe."})
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
    output_dir: str | None = field(
        default=None, metadata={"help": "Where bench.json/.md/.png go (default: runs/bench-<date>-<time>)."}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow a non-empty output directory."}
    )
    quiet: bool = field(default=False, metadata={"help": "No progress lines (the table is still printed)."})

    def __post_init__(self) -> None:
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
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}; use bf16, fp16 or fp32.")
        for name in ("batch_size", "seq_len", "steps", "rounds", "r", "probe_batches", "e2e_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}; it must be >= 1.")
        if self.seq_len < 2:
            raise ValueError(f"seq_len={self.seq_len}; it must be >= 2 (one token predicts the next).")
        if self.target_speedup is not None and not self.target_speedup >= 1:
            raise ValueError(
                f"target_speedup={self.target_speedup}; it must be >= 1 (1.45 = 1.45x faster than lora-all)."
            )
        if self.warmup < 0:
            raise ValueError(f"warmup={self.warmup}; it must be >= 0.")
        if self.probe_batch_size is not None and self.probe_batch_size < 1:
            raise ValueError(f"probe_batch_size={self.probe_batch_size}; it must be >= 1 (or unset).")
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


@dataclass
class Row:
    """One arm at one checkpointing setting, and what was measured for it."""

    arm: str
    gradient_checkpointing: bool
    layers: list[int]
    predicted_speedup: float
    step_seconds: list[list[float]] = field(default_factory=list)  # one list per round
    peak_memory_bytes: int | None = None
    trainable_params: int = 0
    lowest_trained_layer: int | None = None
    checkpoint_kwargs: dict[str, Any] | None = None  # how the top block is checkpointed

    @property
    def median_seconds(self) -> float:
        return statistics.median(t for steps in self.step_seconds for t in steps)

    @property
    def label(self) -> str:
        return f"{self.arm} ({'ckpt' if self.gradient_checkpointing else 'no ckpt'})"


# --------------------------------------------------------------------------- model


def resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but torch sees no CUDA device; pass --device cpu.")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; use bf16, fp16 or fp32.")
    return DTYPES[dtype]


def build_model(
    args: BenchArguments, device: torch.device, dtype: torch.dtype
) -> tuple[nn.Module, dict, Any]:
    """The model under test, a description of it, and its tokenizer (``None`` for random weights).

    ``random_init``: normal init (``initializer_range``) directly on ``device`` in ``dtype``,
    seeded by ``args.seed``; otherwise :func:`aletheia_lora.models.load_model`.
    """
    extra = {"attn_implementation": args.attn_implementation} if args.attn_implementation else {}
    if args.random_init is not None:
        from transformers import AutoModelForCausalLM

        from .presets import get_preset, preset_config

        preset = get_preset(args.random_init)
        config = preset_config(preset.name, num_layers=args.num_layers)
        torch.manual_seed(args.seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, **extra)
        info = {"source": "random_init", "preset": preset.name, "shapes_of": preset.hub_id}
        tokenizer = None
    else:
        from .models import load_model

        model, tokenizer = load_model(args.model, dtype=dtype, device=device)
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
        }
    )
    return model, info, tokenizer


# --------------------------------------------------------------------------- arms


def _enable_checkpointing(model: nn.Module) -> None:
    """Checkpointing as trainers switch it on: the library default, plus input gradients."""
    if callable(getattr(model, "activation_checkpointing_enable", None)):
        model.activation_checkpointing_enable()
    else:  # transformers < 5
        model.gradient_checkpointing_enable()
    # transformers >= 5 already installs the input-gradient hook; a second call would leak one
    if not getattr(model, "_require_grads_hooks", None):
        model.enable_input_require_grads()


def _disable_checkpointing(model: nn.Module) -> None:
    if callable(getattr(model, "activation_checkpointing_disable", None)):
        model.activation_checkpointing_disable()
    else:  # transformers < 5
        model.gradient_checkpointing_disable()
    if callable(getattr(model, "disable_input_require_grads", None)):
        model.disable_input_require_grads()


def _hooks(model: nn.Module) -> dict[int, tuple[set, set]]:
    return {id(m): (set(m._forward_hooks), set(m._forward_pre_hooks)) for m in model.modules()}


def _remove_new_hooks(model: nn.Module, before: dict[int, tuple[set, set]]) -> None:
    for m in model.modules():
        fwd, pre = before.get(id(m), (set(), set()))
        for key in [k for k in m._forward_hooks if k not in fwd]:
            del m._forward_hooks[key]
            m._forward_hooks_always_called.pop(key, None)
            m._forward_hooks_with_kwargs.pop(key, None)
        for key in [k for k in m._forward_pre_hooks if k not in pre]:
            del m._forward_pre_hooks[key]
            m._forward_pre_hooks_with_kwargs.pop(key, None)


@contextlib.contextmanager
def arm_model(
    model: nn.Module, row: Row, *, r: int, seed: int, lora_kwargs: dict[str, Any] | None = None
) -> Iterator[tuple[nn.Module, torch.optim.Optimizer]]:
    """``model`` wrapped for ``row`` (LoRA, checkpointing, truncation) with an AdamW optimizer.

    LoRA is rank ``r`` (alpha ``2 r``) on every adaptable weight, or ``apply_aletheia_lora``'s
    ``lora_kwargs`` (per-role ranks, targets) when given.

    On exit the base model is restored exactly: LoRA unloaded, checkpointing off, every hook
    added on the way removed, ``requires_grad`` flags as before.
    """
    from peft import get_peft_model

    from .architecture import find_blocks
    from .config import apply_aletheia_lora
    from .training import restore_backward, truncate_backward

    hooks = _hooks(model)
    requires_grad = [p.requires_grad for p in model.parameters()]
    lora_config = apply_aletheia_lora(model, row.layers, **(lora_kwargs or {"r": r, "lora_alpha": 2 * r}))
    with torch.random.fork_rng(devices=[]):  # the LoRA init is a function of the seed
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, lora_config)
    try:
        if row.gradient_checkpointing:
            _enable_checkpointing(model)
        if row.arm != BASELINE:
            row.lowest_trained_layer = truncate_backward(peft_model)
        top = find_blocks(model).blocks[-1]
        if getattr(top, "gradient_checkpointing", False):
            row.checkpoint_kwargs = dict(getattr(top._gradient_checkpointing_func, "keywords", {}))
        model.train()
        params = [p for p in peft_model.parameters() if p.requires_grad]
        row.trainable_params = sum(p.numel() for p in params)
        yield peft_model, torch.optim.AdamW(params, lr=1e-4)
    finally:
        if row.gradient_checkpointing:
            _disable_checkpointing(model)
        peft_model.unload()
        restore_backward(model)
        _remove_new_hooks(model, hooks)
        for p, flag in zip(model.parameters(), requires_grad):
            p.grad = None
            p.requires_grad_(flag)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, input_ids: torch.Tensor) -> float:
    """One forward + backward + optimizer step; returns its wall-clock seconds (device-synchronised)."""
    _sync(input_ids.device)
    start = time.perf_counter()
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    _sync(input_ids.device)
    return time.perf_counter() - start


# --------------------------------------------------------------------------- the run


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
    from .training import AletheiaConfig

    return AletheiaConfig().probe_batch_size


def probe_data_label(args: BenchArguments) -> str:
    source = probe_source(args)
    return {RANDOM_TOKENS: "random tokens", "embedded": "the embedded arithmetic task"}.get(source, source)


def _probe_rows(args: BenchArguments, tokenizer, vocab: int) -> list[Any]:
    """What the probe reads: the tokenized task data (cut at ``seq_len``), or random tokens."""
    pbs = probe_batch_size(args)
    source = probe_source(args)
    if source == RANDOM_TOKENS:
        g = torch.Generator().manual_seed(args.seed + 1)
        return [{"input_ids": torch.randint(0, vocab, (args.seq_len,), generator=g).tolist()}
                for _ in range(args.probe_batches * pbs)]  # fmt: skip
    from .pipeline import DataArguments, _prepare_data

    data = DataArguments(
        data=None if source == "embedded" else source, max_length=args.seq_len, max_eval_samples=1
    )
    return _prepare_data(data, tokenizer, args.seed)[3]


def _probe(model, rows: list[Any], args: BenchArguments, device: torch.device) -> tuple[Any, float, float]:
    """Scores from a timed probe on ``rows``; (scores, seconds, warm-up seconds)."""
    from .probe import gradient_probe

    pbs = probe_batch_size(args)
    kwargs = dict(batch_size=pbs, seed=args.seed, device=device)
    start = time.perf_counter()  # first kernels, allocator growth: not part of the probe's cost
    gradient_probe(model, rows[:pbs], probe_batches=1, **kwargs)
    _sync(device)
    warm = time.perf_counter() - start
    start = time.perf_counter()
    scores = gradient_probe(model, rows, probe_batches=args.probe_batches, **kwargs)
    _sync(device)
    return scores, time.perf_counter() - start, warm


def _calibrated(
    model, cost, args: BenchArguments, input_ids: torch.Tensor, log, lora_kwargs: dict[str, Any] | None = None
) -> tuple[Any, list[Row]]:
    """``cost`` fitted to the timed CALIBRATION selections (same warm-up, rounds and steps as the arms)."""
    from .costmodel import calibrate, named_selection

    num_layers = cost.num_layers
    rows = [
        Row(f"calibration:{name}", gc, named_selection(name, num_layers), 0.0)
        for gc in CHECKPOINTING[args.gradient_checkpointing]
        for name in CALIBRATION
    ]
    _time_rows(model, rows, args, input_ids, log, lora_kwargs)
    fitted = calibrate(cost, [(row.layers, row.median_seconds, row.gradient_checkpointing) for row in rows])
    log(f"cost model calibrated on {len(rows)} timed selections; largest fit error "
        f"{fitted.meta['calibration']['max_relative_error']:.1%}")  # fmt: skip
    return fitted, rows


def _rows(model, scores, args: BenchArguments, num_layers: int, cost) -> list[Row]:
    """The (arm, checkpointing) rows with their selections and their speedups predicted by ``cost``."""
    from .costmodel import predict_speedup
    from .selection import select_layers

    rows = []
    for gc in CHECKPOINTING[args.gradient_checkpointing]:
        for arm in args.arms:
            if arm == BASELINE:
                layers, predicted = list(range(num_layers)), 1.0
            else:
                layers = select_layers(
                    scores,
                    args.top_pct,
                    top_k=args.top_k,
                    strategy=arm,
                    seed=args.seed,
                    cost=cost,
                    model=model,
                    target_speedup=args.target_speedup if arm == "depth-aware" else None,
                    gradient_checkpointing=gc,
                )
                predicted = predict_speedup(
                    model,
                    layers,
                    batch_size=args.batch_size,
                    seq_len=args.seq_len,
                    gradient_checkpointing=gc,
                    r=args.r,
                    cost=cost,
                )
            rows.append(Row(arm, gc, [int(i) for i in layers], float(predicted)))
    return rows


def calibrated_cost_model(
    model: nn.Module,
    cost: Any,
    *,
    batch_size: int,
    seq_len: int,
    lora_kwargs: dict[str, Any] | None = None,
    steps: int = 2,
    warmup: int = 1,
    rounds: int = 1,
    seed: int = 0,
    log: Callable[[str], Any] | None = None,
) -> Any:
    """``cost`` fitted to this machine: the CALIBRATION selections trained for a few steps each
    (random tokens, ``batch_size`` x ``seq_len``, where the model is, with ``lora_kwargs``'s
    ranks), as ``bench --calibrate`` does. ``cost`` should be counted at the same shape. The
    model is restored exactly afterwards, train/eval mode included."""
    args = BenchArguments(batch_size=batch_size, seq_len=seq_len, steps=steps, warmup=warmup, rounds=rounds,
                          seed=seed, gradient_checkpointing="off")  # fmt: skip
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed + 2)
    vocab = model.get_input_embeddings().num_embeddings
    input_ids = torch.randint(0, vocab, (batch_size, seq_len), generator=g).to(device)
    training = model.training
    try:
        return _calibrated(model, cost, args, input_ids, log or (lambda *a: None), lora_kwargs)[0]
    finally:
        model.train(training)


def _time_rows(
    model, rows: list[Row], args: BenchArguments, input_ids: torch.Tensor, log, lora_kwargs=None
) -> None:
    device = input_ids.device
    for rnd in range(args.rounds):
        shift = rnd % len(rows)
        for row in rows[shift:] + rows[:shift]:
            with arm_model(model, row, r=args.r, seed=args.seed, lora_kwargs=lora_kwargs) as (
                peft_model,
                optimizer,
            ):
                for _ in range(args.warmup if rnd == 0 else 0):
                    train_step(peft_model, optimizer, input_ids)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                times = [train_step(peft_model, optimizer, input_ids) for _ in range(args.steps)]
                if device.type == "cuda":
                    peak = torch.cuda.max_memory_allocated(device)
                    row.peak_memory_bytes = max(row.peak_memory_bytes or 0, peak)
            del peft_model, optimizer  # the next arm's peak memory must not hold this one's LoRA state
            row.step_seconds.append(times)
            log(
                f"round {rnd + 1}/{args.rounds}  {row.label:<28} {1000 * statistics.median(times):9.1f} ms/step"
            )
            if rnd == 0 and row is rows[0]:
                log(_eta(statistics.median(times), len(rows), args))


def _eta(step_seconds: float, num_rows: int, args: BenchArguments) -> str:
    """How long the rest of a timing pass takes if every step is as long as the first row's."""
    left = (num_rows - 1) * (args.warmup + args.steps) + (args.rounds - 1) * num_rows * args.steps
    return (f"  ({num_rows} timed rows x {args.rounds} rounds: about {step_seconds * left / 60:.1f} min to go "
            f"at this step time; lower --seq_len/--steps/--rounds for a quicker look)")  # fmt: skip


def _results(rows: list[Row], probe_seconds: float, e2e_steps: int) -> list[dict[str, Any]]:
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


def hardware(device: torch.device) -> dict[str, Any]:
    """The machine: CPU model and cores, GPU name and memory when there is one."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            {
                "gpu": props.name,
                "gpu_memory_bytes": props.total_memory,
                "gpu_capability": f"{props.major}.{props.minor}",
                "gpu_count": torch.cuda.device_count(),
                "cuda": torch.version.cuda,
            }
        )
    return info


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
    from .architecture import find_blocks
    from .costmodel import cost_model
    from .io import atomic_write_text
    from .pipeline import check_output_dir, versions

    args = dataclasses.replace(args or BenchArguments(), **overrides)
    say = log or (lambda *a: None)
    if args.quiet:
        say = lambda *a: None  # noqa: E731
    output_dir = args.output_dir or f"runs/bench-{time.strftime('%Y%m%d-%H%M%S')}"
    out = check_output_dir(output_dir, overwrite=args.overwrite_output_dir, create=False)
    if args.random_init is not None:  # an unknown preset fails before anything is built
        from .presets import get_preset

        get_preset(args.random_init)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)

    started = datetime.datetime.now(datetime.timezone.utc)
    model, model_info, tokenizer = build_model(args, device, dtype)
    arch = find_blocks(model)
    vocab = model.get_input_embeddings().num_embeddings
    say(f"model: {model_info.get('preset') or model_info.get('model')} ({model_info['class']}, "
        f"{arch.num_layers} blocks, {model_info['parameters'] / 1e6:,.0f}M parameters, {model_info['dtype']}, {device})")  # fmt: skip

    probe_rows = _probe_rows(args, tokenizer, vocab)
    scores, probe_seconds, probe_warmup = _probe(model, probe_rows, args, device)
    say(f"probe: {probe_seconds:.2f} s for {args.probe_batches} batches of "
        f"{probe_batch_size(args)} rows of {probe_data_label(args)}, at most {args.seq_len} tokens")  # fmt: skip
    g = torch.Generator().manual_seed(args.seed + 2)
    input_ids = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=g).to(device)
    # one cost model at the bench's shape, for depth-aware's choice and for the predictions
    cost = cost_model(model, batch_size=args.batch_size, seq_len=args.seq_len, r=args.r)
    calibration_rows: list[Row] = []
    if args.calibrate:
        cost, calibration_rows = _calibrated(model, cost, args, input_ids, say)
    rows = _rows(model, scores, args, arch.num_layers, cost)
    _time_rows(model, rows, args, input_ids, say)

    results = _results(rows, probe_seconds, args.e2e_steps)
    record: dict[str, Any] = {
        "date": started.isoformat(timespec="seconds"),
        "command": list(command if command is not None else sys.argv),
        "settings": dataclasses.asdict(args) | {"output_dir": str(out)},
        "model": model_info | {"num_layers": arch.num_layers, "blocks_path": arch.blocks_path},
        "hardware": hardware(device) | {"process_max_rss_bytes": _max_rss()},
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
    }
    table = markdown_table(results, args.e2e_steps)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "bench.json", json.dumps(record, indent=1, default=str) + "\n")
    atomic_write_text(out / "bench.md", markdown_report(record, table))
    plot_speedups(results, out / "bench.png", title=_title(record))
    return record | {"table": table, "output_dir": str(out), "files": list(FILES)}


def _max_rss() -> int | None:
    """Peak resident memory of this process in bytes (``None`` where unknown)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


# --------------------------------------------------------------------------- output


def _x(value: float) -> str:
    return f"{value:.2f}x"


def _memory(n: int | None) -> str:
    return "—" if n is None else f"{n / 2**30:.1f} GiB"


def markdown_table(results: list[dict[str, Any]], e2e_steps: int) -> str:
    """The results as a markdown table, one row per arm and checkpointing setting."""
    from .report import _sig, _table

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
                _sig(r["median_ms"], 3),
                _x(r["measured_speedup"]),
                _x(r["predicted_speedup"]),
                e2e,
                _memory(r["peak_memory_bytes"]),
            )
        )
    return "\n".join(_table(header, lines))


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
        f"- model: {source}, {m['num_layers']} blocks, {m['parameters']:,} parameters, {m['dtype']}",
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
    from .report import _new_figure, _save_png

    labels = [f"{r['arm']}\n{'ckpt' if r['gradient_checkpointing'] else 'no ckpt'}" for r in results]
    series = (
        ("measured", "measured_speedup", "#4C72B0"),
        ("predicted", "predicted_speedup", "#DD8452"),
        ("e2e incl. probe", "e2e_speedup", "#55A868"),
    )
    fig = _new_figure((max(7.0, 1.0 + 0.9 * len(results)), 4.5))
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
    _save_png(fig, path)
