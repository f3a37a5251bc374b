"""Trainer callbacks of ``train``: a step timer and a guard against non-finite gradients.

(``TruncatedBackwardCallback`` lives with the truncation it re-applies, in ``truncation.py``.)
"""

from __future__ import annotations

import time
import warnings

import torch
from transformers import TrainerCallback


class StepTimer(TrainerCallback):
    """Wall-clock seconds of each optimizer step (forward, backward, update), device-synchronised."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - self._start)


class NonFiniteGuard(TrainerCallback):
    """Never let a non-finite gradient reach the weights.

    Checked just before each optimizer step. By default a NaN/inf gradient raises
    ``FloatingPointError`` naming the step and the parameter, so no NaN weight is ever stepped
    into, saved or checkpointed (the last checkpoint stays the last good one). With
    ``skip=True`` the step is skipped instead (every gradient is dropped, so the optimizer
    leaves all weights and its state alone), with a warning; ``skipped`` lists those steps.
    """

    def __init__(self, skip: bool = False) -> None:
        self.skip = skip
        self.skipped: list[int] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        bad = next(
            (
                n
                for n, p in model.named_parameters()
                if p.grad is not None and not torch.isfinite(p.grad).all()
            ),
            None,
        )
        if bad is None:
            return
        step = state.global_step + 1
        if not self.skip:
            raise FloatingPointError(
                f"step {step}: non-finite gradient in {bad}; the weights were not updated and nothing was "
                f"saved. Lower the learning rate, train in bf16/fp32 instead of fp16, or pass "
                f"--skip_nonfinite_steps to skip such steps."
            )
        for param in model.parameters():
            param.grad = None  # optimizers skip parameters without a gradient
        self.skipped.append(step)
        warnings.warn(f"step {step}: non-finite gradient in {bad}; step skipped.", stacklevel=2)
