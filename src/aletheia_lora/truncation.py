"""No backward pass below the lowest adapted layer, and checkpointing switched on as trainers do.

A block below every trainable parameter needs no gradient: ``truncate_backward`` runs it under
``no_grad``, so autograd never records it and its activations are never saved. The training
results are unchanged (those blocks' outputs get no gradient anyway); the work saved is the
backward pass through them. ``restore_backward`` undoes it; ``TruncatedBackwardCallback``
re-applies it after a Trainer has switched checkpointing on.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import TrainerCallback

from .architecture import find_blocks


def _enter_no_grad(module, args):
    module._aletheia_grad_mode = torch.is_grad_enabled()
    torch.set_grad_enabled(False)


def _exit_no_grad(module, args, output):
    torch.set_grad_enabled(module.__dict__.pop("_aletheia_grad_mode", True))


def truncate_backward(
    model: nn.Module, *, layers_path: str | None = None, lowest: int | None = None
) -> int | None:
    """Stop the backward pass at the lowest block with trainable parameters; return its index.

    * blocks below it run under ``no_grad`` (forward hooks, idempotent), so no autograd graph
      and no saved activations exist there even if the inputs were made to require grad;
    * input-embedding ``requires_grad`` hooks (``enable_input_require_grads``) are removed;
    * where gradient checkpointing is on, blocks below are not checkpointed and blocks at or
      above it use non-reentrant checkpointing (reentrant needs inputs that require grad).

    ``lowest`` moves the stop higher than the lowest trainable block: the blocks below it train no
    more (``schedules.FreezeSchedule`` freezes a bottom prefix without touching ``requires_grad``).

    Returns ``None`` (and changes nothing) when a parameter outside the blocks is trainable,
    e.g. embeddings in ``modules_to_save``: then the backward pass must reach the bottom.
    Call it again after a trainer switches checkpointing on (``TruncatedBackwardCallback``).
    """
    arch = find_blocks(model, layers_path)
    in_blocks = {id(p) for p in arch.blocks.parameters()}
    if any(p.requires_grad and id(p) not in in_blocks for p in model.parameters()):
        return None
    trainable = [i for i, b in enumerate(arch.blocks) if any(p.requires_grad for p in b.parameters())]
    if not trainable:
        return None
    lowest = trainable[0] if lowest is None else max(trainable[0], lowest)
    for module in model.modules():
        if callable(getattr(module, "disable_input_require_grads", None)) and getattr(
            module, "_require_grads_hooks", None
        ):
            module.disable_input_require_grads()
    for i, block in enumerate(arch.blocks):
        guards = getattr(block, "_aletheia_no_grad_hooks", None)
        if i < lowest and guards is None:
            block._aletheia_no_grad_hooks = (
                block.register_forward_pre_hook(_enter_no_grad),
                block.register_forward_hook(_exit_no_grad, always_call=True),
            )
        elif i >= lowest and guards is not None:
            for handle in guards:
                handle.remove()
            del block._aletheia_no_grad_hooks
        if getattr(block, "gradient_checkpointing", False) or (
            i >= lowest and any(getattr(b, "gradient_checkpointing", False) for b in arch.blocks)
        ):
            block.gradient_checkpointing = i >= lowest
            block._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False)
    return lowest


def restore_backward(model: nn.Module, *, layers_path: str | None = None) -> None:
    """Undo ``truncate_backward``'s no-grad guards (checkpointing settings are left as they are)."""
    for block in find_blocks(model, layers_path).blocks:
        for handle in block.__dict__.pop("_aletheia_no_grad_hooks", ()):
            handle.remove()


class TruncatedBackwardCallback(TrainerCallback):
    """Re-applies ``truncate_backward`` once the Trainer has set up gradient checkpointing."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            truncate_backward(model)


def enable_checkpointing(model: nn.Module) -> None:
    """Checkpointing as trainers switch it on: the library default, plus input gradients."""
    if callable(getattr(model, "activation_checkpointing_enable", None)):
        model.activation_checkpointing_enable()
    else:  # transformers < 5
        model.gradient_checkpointing_enable()
    # transformers >= 5 already installs the input-gradient hook; a second call would leak one
    if not getattr(model, "_require_grads_hooks", None):
        model.enable_input_require_grads()


def disable_checkpointing(model: nn.Module) -> None:
    if callable(getattr(model, "activation_checkpointing_disable", None)):
        model.activation_checkpointing_disable()
    else:  # transformers < 5
        model.gradient_checkpointing_disable()
    if callable(getattr(model, "disable_input_require_grads", None)):
        model.disable_input_require_grads()
