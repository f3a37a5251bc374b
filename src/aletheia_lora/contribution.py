"""The ``contribution`` signal: what each layer's adapter actually did for the loss in a short warm-up.

The other probe signals look at gradients of the frozen model. This one trains: LoRA on *every*
layer (the ranks and alphas the run will train with), ``steps`` AdamW steps on the probe batches,
and for each block ``l`` the first-order loss reduction its adapters delivered,

    contribution[l] = sum over steps t, over LoRA parameters p of block l, of -<g_t(p), Δ_t(p)>

where ``g_t`` is the gradient of step ``t``'s loss and ``Δ_t = θ_{t+1} - θ_t`` the update the
optimizer made from it. By Taylor, ``L(θ + Δ) - L(θ) = <g, Δ> + O(|Δ|²)``, so the layers' terms add
up to the loss drop the step made on its own batch, to first order (a test checks this at a small
learning rate). Unlike a gradient norm it measures progress the optimizer really made, through
the low-rank adapter, after the adapters start to interact (LoRA's ``B`` starts at zero, so the
first step only moves ``B``).

The warm-up is training, not waste: :attr:`Warmup.adapter_state` holds every adapter's weights
after the last step, and :func:`plan.wrap_with_plan` starts the kept layers from them (the other
layers' adapters are dropped). Its optimizer state is not kept.

The model comes back as it went in: no adapters left, the same ``requires_grad`` flags and mode,
its weights untouched (the base weights are frozen throughout).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from .architecture import find_blocks
from .batches import probe_batches as make_probe_batches
from .probe import target_loss

NAME = "contribution"
DEFAULT_LR = 1e-3


@dataclass
class Warmup:
    """What :func:`lora_warmup` measured and left."""

    contribution: dict[int, float]  # block -> summed first-order loss reduction (higher: did more)
    per_step: list[dict[int, float]]  # the same, step by step
    losses: list[float]  # each step's loss before its update
    adapter_state: dict[str, torch.Tensor] = field(repr=False)  # PEFT state-dict key -> CPU tensor
    seconds: float = 0.0


def lora_warmup(
    model: nn.Module,
    dataset: Iterable,
    lora_config: LoraConfig,
    *,
    steps: int = 5,
    batch_size: int = 1,
    max_length: int | None = None,
    lr: float = DEFAULT_LR,
    seed: int = 0,
    tokenizer=None,
    layers_path: str | None = None,
) -> Warmup:
    """Train ``lora_config`` (normally LoRA on every layer) for ``steps`` AdamW steps, one probe batch
    each (the probe's seeded batches), and measure each block's contribution (module docs).

    ``lr``: AdamW's learning rate (no weight decay, no schedule). Returns a :class:`Warmup`."""
    if steps < 1:
        raise ValueError(f"steps={steps}; the warm-up needs at least one step.")
    if not lr > 0:
        raise ValueError(f"lr={lr}; the warm-up's learning rate must be > 0.")
    arch = find_blocks(model, layers_path)
    batches = make_probe_batches(
        dataset, steps, batch_size, max_length=max_length, seed=seed, tokenizer=tokenizer
    )
    device = next(model.parameters()).device
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    modes = {name: m.training for name, m in model.named_modules()}
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):  # LoRA's A matrices: a function of the seed, as in training
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, lora_config)
    try:
        owned = {  # block index -> its LoRA parameters
            layer: [p for name, p in block.named_parameters() if "lora_" in name and p.requires_grad]
            for layer, block in enumerate(arch.blocks)
        }
        params = [p for ps in owned.values() for p in ps]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        peft_model.eval()  # no dropout: the measurement is of the update, not of the noise
        per_step, losses = [], []
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            optimizer.zero_grad(set_to_none=True)
            loss = target_loss(peft_model, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"warm-up step {len(losses)}: the loss is {loss.item()}; lower lr.")
            loss.backward()
            before = {
                id(p): (p.detach().clone(), p.grad.detach().clone()) for p in params if p.grad is not None
            }
            optimizer.step()
            step = {}
            for layer, ps in owned.items():
                terms = [
                    -(before[id(p)][1].double() * (p.detach() - before[id(p)][0]).double()).sum().item()
                    for p in ps
                    if id(p) in before
                ]
                step[layer] = math.fsum(terms)
            per_step.append(step)
            losses.append(loss.item())
        state = {
            key: value.detach().cpu().clone()
            for key, value in peft_model.state_dict().items()
            if "lora_" in key
        }
    finally:
        peft_model.unload()  # the base modules back in place of the LoRA layers, weights untouched
        for attribute in ("peft_config", "_hf_peft_config_loaded"):
            if attribute in vars(model):
                delattr(model, attribute)
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
        for name, m in model.named_modules():
            m.train(modes.get(name, m.training))
    total = {layer: math.fsum(step[layer] for step in per_step) for layer in owned}
    return Warmup(total, per_step, losses, state, time.perf_counter() - start)


def warm_start(peft_model: nn.Module, adapter_state: dict[str, torch.Tensor]) -> int:
    """Load the warm-up's adapter weights into ``peft_model`` wherever a key and shape match (the kept
    layers, when the ranks are the ones the warm-up trained). Returns how many tensors were loaded."""
    own = peft_model.state_dict()
    matching = {k: v for k, v in adapter_state.items() if k in own and own[k].shape == v.shape}
    if matching:
        device = next(iter(own.values())).device
        peft_model.load_state_dict({k: v.to(device, own[k].dtype) for k, v in matching.items()}, strict=False)
    return len(matching)


__all__ = ["DEFAULT_LR", "NAME", "Warmup", "lora_warmup", "warm_start"]
