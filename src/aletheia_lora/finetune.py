"""A short LoRA fine-tune in a plain loop: the data order and the optimizer loop of ``study`` and ``oracle``.

Both commands compare fine-tunes that must differ only in which layers (or ranks) are adapted, so
they share one seeded data order (:func:`batch_order`) and one training loop (:func:`train_arm`):
AdamW, linear warm-up and decay, gradient clipping at 1.0, one :func:`timing.optimizer_step` per batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import get_linear_schedule_with_warmup

from .batches import collate
from .models import load_model
from .settings import ModelSettings
from .timing import optimizer_step


def batch_order(n_rows: int, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """Row indices of every step: a seeded permutation, cycled when steps x batch exceeds the rows."""
    perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed)).tolist()
    flat = [perm[i % n_rows] for i in range(steps * batch_size)]
    return [flat[i : i + batch_size] for i in range(0, len(flat), batch_size)]


def train_arm(
    model: nn.Module, rows: list[dict], order: list[list[int]], args: Any, pad: int
) -> tuple[list[float], list[float]]:
    """AdamW with linear warm-up and decay, gradient clipping at 1.0; returns (losses, step seconds).

    ``args``: anything with ``learning_rate`` and ``warmup_steps`` (``StudyArguments``, ``OracleArguments``).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=0.0)
    schedule = get_linear_schedule_with_warmup(optimizer, args.warmup_steps, len(order))
    device = next(model.parameters()).device
    losses, seconds = [], []
    model.train()
    for step, indices in enumerate(order):
        batch = {k: v.to(device) for k, v in collate([rows[i] for i in indices], pad).items()}
        try:
            loss, took = optimizer_step(model, optimizer, batch, clip=1.0, schedule=schedule)
        except FloatingPointError as err:
            raise FloatingPointError(f"step {step}: {err}") from None
        seconds.append(took)
        losses.append(loss.item())
    return losses, seconds


__all__ = ["batch_order", "load_base", "train_arm"]


def load_base(settings: ModelSettings) -> tuple[nn.Module, Any, torch.device]:
    """The base model every arm starts from, in eval mode, on the GPU when there is one;
    ``(model, tokenizer, device)``."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base, tokenizer = load_model(
        settings.model,
        device=str(device) if device.type == "cuda" else None,
        dtype=settings.torch_dtype_name,
        trust_remote_code=settings.trust_remote_code,
    )
    return base.eval(), tokenizer, device
