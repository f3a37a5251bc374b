"""Over the run: what changes while training. Two schedules, each a small object with plain state.

``FreezeSchedule`` (progressive freezing, after AutoFreeze, arXiv 2102.01386): LoRA starts on every
block (or a static pick). The training's own backward pass feeds a per-block statistic, the squared
norm of the block's adapter gradients summed over an interval of ``interval`` steps; no extra pass.
At the end of each interval the statistic is compared with the previous interval's::

    change[l] = |S_l(now) - S_l(before)| / S_l(before)

and the contiguous bottom prefix of blocks whose change is below ``threshold`` is frozen: their
adapters stop training (they stay in the saved adapter: they were trained) and the truncated backward
(``truncation.truncate_backward``) moves up to the lowest block still training. Layers converge
bottom-up (SVCCA, arXiv 1706.05806), so a prefix is what freezes first; a block above an unconverged
one waits for it, because freezing it alone would not shorten the backward.

``DropSchedule`` (probe-weighted backward dropping, after DropBP, arXiv 2402.17812): every adapted
block runs its forward; on each step block l's backward is skipped with probability ``rates[l]``. A
skipped block is computed without autograd and its output passed on as ``h + (x - x.detach())``: the
same value, and the gradient reaches the block below through the residual path unchanged, while the
block's own adapters get none that step. :func:`drop_rates` sets the rates from the probe's scores
(a low score drops more often) and the cost model, so that the expected step cost meets a target.
Decisions are a function of ``(seed, step)``, so a resumed run drops exactly the same backward passes.

Both keep their state in ``state_dict()`` (saved beside a checkpoint, see ``ScheduleCallback``) and
both work under DDP: the freezing statistic is all-reduced before a decision, and drop decisions are
the same on every rank by construction.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .architecture import find_blocks
from .costmodel import CostModel
from .truncation import truncate_backward

SCHEDULES = ("static", "freeze", "drop")


def _adapter_params(block: nn.Module) -> list[nn.Parameter]:
    return [p for name, p in block.named_parameters() if "lora_" in name]


# --------------------------------------------------------------------------- progressive freezing


@dataclass
class FreezeState:
    """What a resumed run needs to continue the schedule exactly."""

    frozen: int = 0  # blocks 0 .. frozen-1 are frozen
    steps_seen: int = 0  # optimizer steps observed so far
    previous: list[float] | None = None  # last complete interval's statistic per block
    current: list[float] | None = None  # the running interval's partial sums
    history: list[dict[str, Any]] = field(default_factory=list)  # one entry per decision


class FreezeSchedule:
    """Freeze a converged bottom prefix of adapted blocks; see the module docs.

    ``interval``: steps per statistic interval (a decision after each). ``threshold``: relative change
    below which a block counts as converged. ``min_steps``: no decision before this many steps (LoRA's
    B matrices start at zero, so the first gradients say little). ``max_frozen``: never freeze more
    than this share of the adapted blocks.

    Call :meth:`attach` once on the PEFT model, then :meth:`step_end` after every optimizer step
    (``ScheduleCallback`` does both under a ``Trainer``; ``finetune.train_arm`` in a plain loop).
    """

    def __init__(
        self,
        *,
        interval: int = 8,
        threshold: float = 0.25,
        min_steps: int = 16,
        max_frozen: float = 0.75,
        layers_path: str | None = None,
    ) -> None:
        if interval < 1 or min_steps < 0:
            raise ValueError(
                f"interval={interval}, min_steps={min_steps}; use interval >= 1 and min_steps >= 0."
            )
        if not threshold > 0:
            raise ValueError(f"freeze threshold={threshold}; it must be > 0 (e.g. 0.25).")
        if not 0 < max_frozen < 1:
            raise ValueError(f"max_frozen={max_frozen}; it must be a share in (0, 1), e.g. 0.75.")
        self.interval, self.threshold, self.min_steps, self.max_frozen = (
            interval,
            threshold,
            min_steps,
            max_frozen,
        )
        self.layers_path = layers_path
        self.state = FreezeState()
        self.model: nn.Module | None = None
        self.blocks: list[int] = []  # the adapted blocks, bottom up
        self._params: list[list[nn.Parameter]] = []
        self._sums: torch.Tensor | None = None  # this interval's sums, on the device (no host sync per step)
        self._handles: list[Any] = []

    # -- wiring

    def attach(self, model: nn.Module) -> None:
        """Hook every adapter parameter's gradient (the statistic) and apply the saved freeze state."""
        self.detach()
        self.model = model
        arch = find_blocks(model, self.layers_path)
        per_block = [_adapter_params(b) for b in arch.blocks]
        self.blocks = [i for i, params in enumerate(per_block) if params]
        if not self.blocks:
            raise ValueError(
                "the freeze schedule found no LoRA parameters in the model's blocks; wrap it first."
            )
        self._params = [per_block[i] for i in self.blocks]
        device = self._params[0][0].device
        self._sums = torch.zeros(len(self.blocks), dtype=torch.float64, device=device)
        if self.state.current is not None:
            self._sums += torch.tensor(self.state.current, dtype=torch.float64, device=device)
        for k, params in enumerate(self._params):
            for p in params:
                if p.requires_grad:
                    self._handles.append(p.register_hook(self._observer(k)))
        self._apply()

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _observer(self, k: int):
        def observe(grad: torch.Tensor) -> None:
            self._sums[k] += grad.detach().float().pow(2).sum()

        return observe

    # -- the rule

    @property
    def frozen_blocks(self) -> list[int]:
        return self.blocks[: self.state.frozen]

    def step_end(self, step: int | None = None) -> bool:
        """Count one optimizer step; at the end of an interval, decide. Returns True when blocks froze."""
        self.state.steps_seen += 1
        if self.state.steps_seen % self.interval:
            return False
        sums = self._sums.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)  # every rank decides on the same numbers
        now = sums.tolist()  # the one host sync, once per interval
        self._sums.zero_()
        before, self.state.previous = self.state.previous, now
        if before is None or self.state.steps_seen < self.min_steps:
            return False
        change = [abs(a - b) / b if b > 0 else math.inf for a, b in zip(now, before)]
        limit = max(0, min(len(self.blocks) - 1, math.floor(self.max_frozen * len(self.blocks))))
        frozen = self.state.frozen
        while frozen < limit and change[frozen] < self.threshold:
            frozen += 1
        froze = frozen > self.state.frozen
        self.state.history.append(
            {
                "step": self.state.steps_seen if step is None else step,
                "change": [round(c, 6) if math.isfinite(c) else None for c in change],
                "frozen_before": self.state.frozen,
                "frozen_after": frozen,
            }
        )
        self.state.frozen = frozen
        if froze:
            self._apply()
        return froze

    def _apply(self) -> None:
        """Move the truncated backward up to the lowest adapted block still training.

        The frozen adapters keep ``requires_grad`` (an optimizer built before, or restored from a
        checkpoint, still lists them); they sit below the truncation, so no gradient reaches them and
        the optimizer skips them (``grad is None``)."""
        self.drop_frozen_grads()
        if self.state.frozen and self.model is not None:
            truncate_backward(self.model, layers_path=self.layers_path, lowest=self.blocks[self.state.frozen])

    def drop_frozen_grads(self) -> None:
        """Clear any gradient a frozen adapter still holds (a DDP reducer may have written zeros), so the
        optimizer skips it rather than moving it by its momentum."""
        for params in self._params[: self.state.frozen]:
            for p in params:
                p.grad = None

    # -- state

    def state_dict(self) -> dict[str, Any]:
        current = self._sums.tolist() if self._sums is not None else self.state.current
        return {
            "kind": "freeze",
            "interval": self.interval,
            "threshold": self.threshold,
            "min_steps": self.min_steps,
            "max_frozen": self.max_frozen,
            "frozen": self.state.frozen,
            "frozen_blocks": self.frozen_blocks,
            "steps_seen": self.state.steps_seen,
            "previous": self.state.previous,
            "current": current,
            "history": self.state.history,
        }

    def load_state_dict(self, data: dict[str, Any]) -> None:
        if data.get("kind") != "freeze":
            raise ValueError(f"a {data.get('kind')!r} schedule state cannot resume a freeze schedule.")
        self.state = FreezeState(
            frozen=int(data["frozen"]),
            steps_seen=int(data["steps_seen"]),
            previous=data.get("previous"),
            current=data.get("current"),
            history=list(data.get("history", [])),
        )
        if self.model is not None:
            self.attach(self.model)


# --------------------------------------------------------------------------- backward dropping


def drop_rates(
    scores: Sequence[float],
    adapted: Sequence[int],
    cost: CostModel,
    *,
    target_speedup: float,
    max_rate: float = 0.8,
) -> tuple[list[float], float]:
    """Per-block backward-drop probabilities that meet ``target_speedup`` in expectation, and the speedup
    they are predicted to give (lower than the target when even ``max_rate`` everywhere cannot reach it).

    A block's rate is ``min(max_rate, lam * mean(score) / score[l])`` (a block the probe rates low is
    dropped more often), ``lam`` found by bisection so that the expected saving equals what the target
    needs. Dropping block l saves its activation backward and the backward share (2/3) of its LoRA cost.
    ``scores`` has one entry per block; blocks not in ``adapted`` keep rate 0.
    """
    if not target_speedup >= 1:
        raise ValueError(f"drop target_speedup={target_speedup}; it must be >= 1 (1: no dropping).")
    if not 0 <= max_rate <= 1:
        raise ValueError(f"max_drop_rate={max_rate}; it must be in [0, 1].")
    n = cost.num_layers
    full = cost.step_cost(adapted)
    need = full - full / target_speedup
    saves = [cost.backward[i] + 2 / 3 * cost.lora[i] if i in set(adapted) else 0.0 for i in range(n)]
    mean_score = sum(scores[i] for i in adapted) / len(adapted)
    weight = [mean_score / max(scores[i], 1e-12) if saves[i] else 0.0 for i in range(n)]

    def rates(lam: float) -> list[float]:
        return [min(max_rate, lam * w) for w in weight]

    def saved(lam: float) -> float:
        return math.fsum(r * s for r, s in zip(rates(lam), saves))

    lo, hi = 0.0, 1.0
    while saved(hi) < need and hi < 1e6 and any(r < max_rate for r, w in zip(rates(hi), weight) if w):
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if saved(mid) < need else (lo, mid)
    out = rates(hi) if need > 0 else [0.0] * n
    return out, full / (full - math.fsum(r * s for r, s in zip(out, saves)))


def scheduled_step_cost(
    cost: CostModel, adapted: Sequence[int], *, lowest: int, dropped: Sequence[int] = ()
) -> float:
    """One step's cost in ``cost``'s unit when LoRA is on ``adapted``, the backward stops at block ``lowest``
    (a frozen prefix below it) and the blocks in ``dropped`` skip their backward (their activation backward
    and the backward share, 2/3, of their LoRA cost)."""
    gone = set(dropped)
    backward = math.fsum(cost.backward[i] for i in range(lowest, cost.num_layers) if i not in gone)
    lora = math.fsum(cost.lora[i] * (1 / 3 if i in gone or i < lowest else 1) for i in adapted)
    return math.fsum(cost.forward) + cost.head + cost.head_backward + backward + lora


def _hidden_argument(args: tuple, kwargs: dict) -> tuple[torch.Tensor | None, bool]:
    if args and isinstance(args[0], torch.Tensor):
        return args[0], True
    return kwargs.get("hidden_states"), False


class DropSchedule:
    """Skip block l's backward with probability ``rates[l]`` on each training step; see the module docs.

    Call :meth:`attach` on the model once, :meth:`step_begin(step)` before each step's forward (the
    callback and ``finetune.train_arm`` do). ``dropped`` holds the current step's skipped blocks and
    ``counts`` how often each block was skipped.
    """

    def __init__(self, rates: Sequence[float], *, seed: int = 0, layers_path: str | None = None) -> None:
        bad = [r for r in rates if not 0 <= r <= 1]
        if bad:
            raise ValueError(f"drop rates {bad} are not probabilities; each must be in [0, 1].")
        self.rates = [float(r) for r in rates]
        self.seed = seed
        self.layers_path = layers_path
        self.dropped: frozenset[int] = frozenset()
        self.counts = [0] * len(self.rates)
        self.steps = 0
        self._handles: list[Any] = []
        self._params: dict[int, list[nn.Parameter]] = {}

    def attach(self, model: nn.Module) -> None:
        self.detach()
        blocks = find_blocks(model, self.layers_path).blocks
        if len(blocks) != len(self.rates):
            raise ValueError(
                f"{len(self.rates)} drop rates for a model with {len(blocks)} blocks; give one per block."
            )
        self._params = {i: _adapter_params(block) for i, block in enumerate(blocks) if self.rates[i] > 0}
        for i, block in enumerate(blocks):
            if self.rates[i] > 0:
                self._handles += [
                    block.register_forward_pre_hook(self._enter(i), with_kwargs=True),
                    block.register_forward_hook(self._exit(i), with_kwargs=True, always_call=True),
                ]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def decisions(self, step: int) -> frozenset[int]:
        """The blocks whose backward is skipped on ``step``: a function of (seed, step) alone."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        draws = torch.rand(len(self.rates), generator=g).tolist()
        return frozenset(i for i, (u, r) in enumerate(zip(draws, self.rates)) if u < r)

    def clear_dropped_grads(self) -> None:
        """Clear any gradient a block skipped this step still holds (a DDP reducer may have written zeros),
        so the optimizer skips its adapters as it does in a single process."""
        for i in self.dropped:
            for p in self._params.get(i, ()):
                p.grad = None

    def step_begin(self, step: int) -> None:
        self.dropped = self.decisions(step)
        for i in self.dropped:
            self.counts[i] += 1
        self.steps += 1

    def _enter(self, i: int):
        def pre(module, args, kwargs):
            if i not in self.dropped or not module.training or not torch.is_grad_enabled():
                return None
            x, _ = _hidden_argument(args, kwargs)
            if x is None or not x.requires_grad:
                return None  # nothing flows below: plain no-grad is all the skip needs
            module._aletheia_drop_input = x
            torch.set_grad_enabled(False)
            return None

        return pre

    def _exit(self, i: int):
        def post(module, args, kwargs, output):
            x = module.__dict__.pop("_aletheia_drop_input", None)
            if x is None:
                return None
            torch.set_grad_enabled(True)
            through = x - x.detach()  # zero, with the identity as its gradient
            if isinstance(output, torch.Tensor):
                return output + through
            return (output[0] + through, *output[1:])

        return post

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "drop",
            "rates": self.rates,
            "seed": self.seed,
            "counts": self.counts,
            "steps": self.steps,
        }

    def load_state_dict(self, data: dict[str, Any]) -> None:
        if data.get("kind") != "drop":
            raise ValueError(f"a {data.get('kind')!r} schedule state cannot resume a drop schedule.")
        if [float(r) for r in data["rates"]] != self.rates or int(data["seed"]) != self.seed:
            raise ValueError(
                "the checkpoint's drop rates or seed differ from this run's; resume with the same probe, "
                "--drop_target_speedup and --seed."
            )
        self.counts, self.steps = list(data["counts"]), int(data["steps"])


Schedule = FreezeSchedule | DropSchedule


# --------------------------------------------------------------------------- under a Trainer


class ScheduleCallback(TrainerCallback, ExportableState):
    """Runs a schedule under ``transformers.Trainer``; its state rides in every checkpoint.

    The state is exported through ``TrainerState.stateful_callbacks``, so it is written inside the
    checkpoint's own ``trainer_state.json`` (a checkpoint that has one has the other). To resume, read
    it back with :func:`checkpoint_schedule_state` and :meth:`load_state_dict` the schedule before
    ``trainer.train(resume_from_checkpoint=...)``. Add this callback after ``TruncatedBackwardCallback``
    (it re-truncates for a frozen prefix once checkpointing is set up).
    """

    def __init__(self, schedule: Schedule | None = None) -> None:
        self.schedule = schedule

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and self.schedule is not None:
            self.schedule.attach(model)

    def on_step_begin(self, args, state, control, **kwargs):
        if isinstance(self.schedule, DropSchedule):
            self.schedule.step_begin(state.global_step)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if isinstance(self.schedule, FreezeSchedule):
            self.schedule.drop_frozen_grads()
        elif isinstance(self.schedule, DropSchedule):
            self.schedule.clear_dropped_grads()

    def on_step_end(self, args, state, control, **kwargs):
        if isinstance(self.schedule, FreezeSchedule):
            self.schedule.step_end(state.global_step)
        elif isinstance(self.schedule, DropSchedule):
            self.schedule.dropped = frozenset()

    def state(self) -> dict:
        return {
            "args": {},
            "attributes": {"schedule_state": self.schedule.state_dict() if self.schedule else None},
        }


def checkpoint_schedule_state(checkpoint: str) -> dict[str, Any] | None:
    """The schedule state a ``Trainer`` checkpoint folder holds (None when the run had no schedule)."""
    path = Path(checkpoint) / "trainer_state.json"
    if not path.is_file():
        return None
    stored = json.loads(path.read_text()).get("stateful_callbacks", {}).get(ScheduleCallback.__name__)
    if isinstance(stored, list):
        stored = stored[0] if stored else None
    return (stored or {}).get("attributes", {}).get("schedule_state")


__all__ = [
    "SCHEDULES",
    "DropSchedule",
    "FreezeSchedule",
    "FreezeState",
    "Schedule",
    "ScheduleCallback",
    "checkpoint_schedule_state",
    "drop_rates",
    "scheduled_step_cost",
]
