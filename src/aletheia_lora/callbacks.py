"""Trainer callbacks of ``train``: a step timer, a guard against non-finite gradients, and the probe's
scores, the selection and the speed written into the run's TensorBoard (``--report_to tensorboard``).

(``TruncatedBackwardCallback`` lives with the truncation it re-applies, in ``truncation.py``.)
"""

from __future__ import annotations

import statistics
import time
import warnings
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.integrations import TensorBoardCallback

from .report import speed_line


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


class PlanToTensorBoard(TrainerCallback):
    """The probe and the selection beside the loss curves, in the Trainer's own TensorBoard run (written
    through its ``TensorBoardCallback``'s writer, so one run folder holds everything).

    At the start of training, for every layer ``l`` (the TensorBoard step is the layer index, so each
    tag draws a curve over depth): ``aletheia/layer_score`` (the score layers were ranked by),
    ``aletheia/signal/<name>`` (every signal the probe computed) and ``aletheia/selected`` (1 for an
    adapted layer, else 0); the texts ``aletheia/selection`` (the chosen layers and settings) and
    ``aletheia/layer_scores`` (a table); the scalar ``aletheia/predicted_speedup``. At the end:
    ``aletheia/seconds_per_step`` (median step time after the first step, :class:`StepTimer`) and the
    text ``aletheia/speed`` (the line ``train`` prints).
    """

    def __init__(self, board: TensorBoardCallback, plan: Any, timer: StepTimer | None = None, device=None):
        self.board, self.plan, self.timer, self.device = board, plan, timer, device
        self.writer = None  # the board's, kept: it closes (and forgets) it before our on_train_end

    def on_train_begin(self, args, state, control, **kwargs):
        self.writer = self.board.tb_writer  # made by the board's on_train_begin, which runs first
        if not state.is_world_process_zero or self.writer is None:
            return
        plan, writer = self.plan, self.writer
        score = plan.scores.meta.get("score", "grad-norm")
        selected = set(plan.selected_layers)
        for layer, value in sorted(plan.scores.items()):
            writer.add_scalar("aletheia/layer_score", value, layer)
            writer.add_scalar("aletheia/selected", float(layer in selected), layer)
        for signal, values in sorted(plan.scores.signals.items()):
            for layer, value in sorted(values.items()):
                writer.add_scalar(f"aletheia/signal/{signal}", value, layer)
        writer.add_text(
            "aletheia/selection",
            f"adapting layers {sorted(selected)} of {plan.num_layers} (strategy {plan.config.strategy}, "
            f"ranked by {score}); {plan.trainable_params:,} trainable parameters, "
            f"{plan.trainable_fraction:.0%} of all-layer LoRA; probe {plan.probe_seconds:.1f} s",
        )
        rows = [f"| {layer} | {value:.6g} | {'yes' if layer in selected else ''} |"
                for layer, value in sorted(plan.scores.items())]  # fmt: skip
        writer.add_text(
            "aletheia/layer_scores", "\n".join([f"| layer | {score} | adapted |", "|---|---|---|", *rows])
        )
        if plan.predicted_speedup is not None:
            writer.add_scalar("aletheia/predicted_speedup", plan.predicted_speedup, 0)
        writer.flush()

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or self.writer is None:
            return
        seconds = self.timer.seconds if self.timer is not None else []
        steady = seconds[1:] or seconds  # the first step pays for warm-up
        per_step = statistics.median(steady) if steady else None
        if per_step is not None:
            self.writer.add_scalar("aletheia/seconds_per_step", per_step, state.global_step)
        line = speed_line(self.plan.predicted_speedup, self.plan.calibration, per_step, self.device)
        self.writer.add_text("aletheia/speed", line, state.global_step)
        self.writer.close()  # a closed torch SummaryWriter reopens a file in the same folder to write


def plan_to_tensorboard(trainer: Any, plan: Any, timer: StepTimer | None = None) -> PlanToTensorBoard | None:
    """Add :class:`PlanToTensorBoard` to ``trainer`` when it reports to TensorBoard (``report_to``
    names ``tensorboard``, or ``all`` with it installed); returns the callback, or ``None``."""
    board = next(
        (cb for cb in trainer.callback_handler.callbacks if isinstance(cb, TensorBoardCallback)), None
    )
    if board is None:
        return None
    callback = PlanToTensorBoard(board, plan, timer, device=str(trainer.args.device))
    trainer.add_callback(callback)
    return callback
