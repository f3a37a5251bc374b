"""One training step and one interleaved timer, for bench, study and cost-model calibration.

A *timed arm* is a set of adapted layers trained a few steps; several arms are timed in
interleaved rounds, the order rotating each round, so that slow drift of the machine hits every
arm alike:

    round 1: a, b, c      round 2: b, c, a      round 3: c, a, b

Every step is forward + backward + optimizer step, device-synchronised before and after.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import get_peft_model
from torch import nn

from .architecture import find_blocks
from .costmodel import CostModel, calibrate, named_selection
from .lora_config import apply_aletheia_lora
from .truncation import disable_checkpointing, enable_checkpointing, restore_backward, truncate_backward

# Timed to calibrate the cost model: they differ in lowest layer and in count (so forward, backward
# and LoRA costs separate), and none of them is a bench arm, so the arms' predictions stay out of sample.
CALIBRATION = ("every_other", "bottom_quarter", "top_quarter")

Log = Callable[[str], Any]


def _quiet(*_: Any) -> None:
    return None


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def optimizer_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    *,
    clip: float | None = None,
    schedule: Any = None,
) -> tuple[torch.Tensor, float]:
    """Forward, backward, (clip the trainable gradients' norm at ``clip``), optimizer and schedule step.

    Returns ``(loss, seconds)``: the detached loss and the device-synchronised wall-clock time.
    A non-finite loss raises ``FloatingPointError`` (checked after the step, so that the check adds
    no synchronisation inside the timed region).
    """
    device = batch["input_ids"].device
    synchronize(device)
    start = time.perf_counter()
    loss = model(**batch).loss
    loss.backward()
    if clip is not None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, clip)
    optimizer.step()
    if schedule is not None:
        schedule.step()
    optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    seconds = time.perf_counter() - start
    if not torch.isfinite(loss):
        raise FloatingPointError(f"the loss is {loss.item()}; lower --learning_rate.")
    return loss.detach(), seconds


def interleaved(names: Sequence[str], rounds: int, run: Callable[[str, int], Any], log: Log = _quiet) -> None:
    """Call ``run(name, round)`` for every name in every round, the order rotating by one each round."""
    names = list(names)
    for rnd in range(rounds):
        shift = rnd % len(names)
        for name in names[shift:] + names[:shift]:
            run(name, rnd)


# --------------------------------------------------------------------------- timed arms


@dataclass
class TimedArm:
    """A set of adapted layers to time, and what was measured for it."""

    arm: str
    gradient_checkpointing: bool
    layers: list[int]
    predicted_speedup: float | None = None
    truncate: bool = True  # no backward below the lowest adapted layer (False: plain PEFT, as users run it)
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


def _hooks(model: nn.Module) -> dict[int, tuple[set, set]]:
    return {id(m): (set(m._forward_hooks), set(m._forward_pre_hooks)) for m in model.modules()}


def _remove_new_hooks(model: nn.Module, before: dict[int, tuple[set, set]]) -> None:
    # torch has no public API to list and remove hooks that others (PEFT, checkpointing) added
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
    model: nn.Module, arm: TimedArm, *, lora_kwargs: dict[str, Any], seed: int
) -> Iterator[tuple[nn.Module, torch.optim.Optimizer]]:
    """``model`` wrapped for ``arm`` (LoRA by ``apply_aletheia_lora(**lora_kwargs)``, checkpointing,
    truncation) with an AdamW optimizer; records the arm's trainable parameters and lowest trained layer.

    On exit the base model is restored exactly: LoRA unloaded, checkpointing off, every hook
    added on the way removed, ``requires_grad`` flags as before.
    """
    hooks = _hooks(model)
    requires_grad = [p.requires_grad for p in model.parameters()]
    lora_config = apply_aletheia_lora(model, arm.layers, **lora_kwargs)
    with torch.random.fork_rng(devices=[]):  # the LoRA init is a function of the seed
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, lora_config)
    try:
        if arm.gradient_checkpointing:
            enable_checkpointing(model)
        if arm.truncate:
            arm.lowest_trained_layer = truncate_backward(peft_model)
        top = find_blocks(model).blocks[-1]
        if getattr(top, "gradient_checkpointing", False):
            arm.checkpoint_kwargs = dict(getattr(top._gradient_checkpointing_func, "keywords", {}))
        model.train()
        params = [p for p in peft_model.parameters() if p.requires_grad]
        arm.trainable_params = sum(p.numel() for p in params)
        yield peft_model, torch.optim.AdamW(params, lr=1e-4)
    finally:
        if arm.gradient_checkpointing:
            disable_checkpointing(model)
        peft_model.unload()
        restore_backward(model)
        _remove_new_hooks(model, hooks)
        for p, flag in zip(model.parameters(), requires_grad):
            p.grad = None
            p.requires_grad_(flag)


def time_arms(
    model: nn.Module,
    arms: list[TimedArm],
    input_ids: torch.Tensor,
    *,
    lora_kwargs: dict[str, Any],
    steps: int,
    warmup: int,
    rounds: int,
    seed: int,
    log: Log = _quiet,
    eta: Callable[[float], str] | None = None,
) -> None:
    """Time every arm on ``input_ids`` (labels = inputs) in ``rounds`` interleaved rounds of ``steps``
    steps, after ``warmup`` untimed steps in the first round. Each arm is wrapped afresh every round
    (``arm_model``). Fills ``step_seconds`` and, on a GPU, ``peak_memory_bytes``. ``eta(seconds)``
    turns the first arm's median step time into a line about the time left."""
    device = input_ids.device
    batch = {"input_ids": input_ids, "labels": input_ids}
    by_label = {arm.label: arm for arm in arms}
    first = arms[0].label

    def run(label: str, rnd: int) -> None:
        arm = by_label[label]
        with arm_model(model, arm, lora_kwargs=lora_kwargs, seed=seed) as (peft_model, optimizer):
            for _ in range(warmup if rnd == 0 else 0):
                optimizer_step(peft_model, optimizer, batch)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times = [optimizer_step(peft_model, optimizer, batch)[1] for _ in range(steps)]
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device)
                arm.peak_memory_bytes = max(arm.peak_memory_bytes or 0, peak)
        del peft_model, optimizer  # the next arm's peak memory must not hold this one's LoRA state
        arm.step_seconds.append(times)
        log(f"round {rnd + 1}/{rounds}  {arm.label:<28} {1000 * statistics.median(times):9.1f} ms/step")
        if rnd == 0 and label == first and eta is not None:
            log(eta(statistics.median(times)))

    interleaved(list(by_label), rounds, run)


# --------------------------------------------------------------------------- calibration


def calibrate_by_timing(
    model: nn.Module,
    cost: CostModel,
    input_ids: torch.Tensor,
    *,
    lora_kwargs: dict[str, Any],
    checkpointing: Sequence[bool] = (False,),
    steps: int = 2,
    warmup: int = 1,
    rounds: int = 1,
    seed: int = 0,
    log: Log = _quiet,
) -> tuple[CostModel, list[TimedArm]]:
    """``cost`` fitted (``costmodel.calibrate``) to the CALIBRATION selections timed on ``input_ids``;
    returns the fitted model and the timed arms."""
    arms = [
        TimedArm(f"calibration:{name}", gc, named_selection(name, cost.num_layers))
        for gc in checkpointing
        for name in CALIBRATION
    ]
    time_arms(model, arms, input_ids, lora_kwargs=lora_kwargs, steps=steps, warmup=warmup, rounds=rounds,
              seed=seed, log=log)  # fmt: skip
    fitted = calibrate(cost, [(a.layers, a.median_seconds, a.gradient_checkpointing) for a in arms])
    log(f"cost model calibrated on {len(arms)} timed selections; largest fit error "
        f"{fitted.meta['calibration']['max_relative_error']:.1%}")  # fmt: skip
    return fitted, arms


def random_tokens(model: nn.Module, batch_size: int, seq_len: int, seed: int) -> torch.Tensor:
    """``batch_size`` x ``seq_len`` token ids drawn uniformly from the vocabulary, where the model is."""
    vocab = model.get_input_embeddings().num_embeddings
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch_size, seq_len), generator=g).to(next(model.parameters()).device)


def calibrated_cost_model(
    model: nn.Module,
    cost: CostModel,
    *,
    batch_size: int,
    seq_len: int,
    lora_kwargs: dict[str, Any],
    steps: int = 2,
    warmup: int = 1,
    rounds: int = 1,
    seed: int = 0,
    log: Log = _quiet,
) -> CostModel:
    """``cost`` fitted to this machine: the CALIBRATION selections trained for a few steps each
    (random tokens, ``batch_size`` x ``seq_len``, where the model is, with ``lora_kwargs``'s
    ranks), as ``bench --calibrate`` does. ``cost`` should be counted at the same shape. The
    model is restored exactly afterwards, train/eval mode included."""
    input_ids = random_tokens(model, batch_size, seq_len, seed + 2)
    training = model.training
    try:
        return calibrate_by_timing(model, cost, input_ids, lora_kwargs=lora_kwargs, steps=steps, warmup=warmup,
                                   rounds=rounds, seed=seed, log=log)[0]  # fmt: skip
    finally:
        model.train(training)


__all__ = [
    "CALIBRATION",
    "TimedArm",
    "arm_model",
    "calibrate_by_timing",
    "calibrated_cost_model",
    "interleaved",
    "optimizer_step",
    "random_tokens",
    "synchronize",
    "time_arms",
]
