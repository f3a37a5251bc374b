"""Selected layers + ranks -> ``peft.LoraConfig``.

The config adapts only the selected blocks (``layers_to_transform`` + ``layers_pattern``),
on the adaptable weights the architecture reports, with optional per-role ranks:
``attention_r`` for attention weights, ``mlp_r`` for MLP and MoE expert weights.

Scaling. LoRA scales its update by ``alpha / r``. When ``attention_r`` or ``mlp_r`` is given
without its alpha, that part's alpha is set so that ``alpha / r`` stays ``lora_alpha / r``
(``r=16, lora_alpha=32, mlp_r=64`` gives MLP alpha 128, scaling 2 everywhere). The
published package kept alpha fixed, which silently shrank the MLP update 4x at r=64.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Iterable, Sequence

from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key
from torch import nn

from .architecture import Architecture, Target, find_blocks, guess_role, weight_shape

# Used only by `aletheia_lora_config` without a model: Llama-style names.
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _check_rank(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name}={value!r}; a LoRA rank must be an integer >= 1 (e.g. {name}=16).")


def _check_layers(selected_layers: Iterable[int], num_layers: int | None) -> list[int]:
    layers = list(selected_layers)
    bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, numbers.Integral)]
    if bad:
        raise TypeError(f"selected_layers must be integers; got {bad!r}.")
    layers = [int(i) for i in layers]
    if not layers:
        raise ValueError("selected_layers is empty; pass at least one layer index (see select_layers).")
    dupes = sorted({i for i in layers if layers.count(i) > 1})
    if dupes:
        raise ValueError(f"selected_layers has duplicates {dupes}; each layer can be selected once.")
    limit = num_layers if num_layers is not None else float("inf")
    out = [i for i in layers if not 0 <= i < limit]
    if out:
        raise ValueError(
            f"selected_layers {out} are out of range: the model has {num_layers} layers (valid: 0..{num_layers - 1})."
            if num_layers is not None
            else f"selected_layers {out} are negative; layer indices start at 0."
        )
    return sorted(layers)


def aletheia_lora_config(
    selected_layers: Sequence[int],
    r: int = 16,
    lora_alpha: float = 32,
    attention_r: int | None = None,
    mlp_r: int | None = None,
    attention_alpha: float | None = None,
    mlp_alpha: float | None = None,
    lora_dropout: float = 0.0,
    target_modules: Sequence[str] | None = None,
    task_type: str | None = "CAUSAL_LM",
    *,
    layers_pattern: str = "layers",
    roles: dict[str, str] | None = None,
    target_parameters: Sequence[str] | None = None,
    num_layers: int | None = None,
    **lora_kwargs,
) -> LoraConfig:
    """Build the LoraConfig for ``selected_layers`` without looking at a model.

    ``target_modules`` are block-relative names (default: Llama-style q/k/v/o and
    gate/up/down projections); ``roles`` maps each to ``attention`` / ``mlp`` / ``expert``
    (default: guessed from the name). ``target_parameters`` are full parameter paths
    (MoE expert tensors). Extra keyword arguments go to ``LoraConfig``.
    Use :func:`apply_aletheia_lora` to have all of this read from the model.
    """
    layers = _check_layers(selected_layers, num_layers)
    for name, value in (("r", r), ("attention_r", attention_r), ("mlp_r", mlp_r)):
        _check_rank(name, value)
    if lora_alpha <= 0:
        raise ValueError(f"lora_alpha={lora_alpha!r}; it must be > 0 (commonly 2 * r).")
    if not 0 <= lora_dropout < 1:
        raise ValueError(f"lora_dropout={lora_dropout!r}; it must be in [0, 1).")
    modules = list(DEFAULT_TARGET_MODULES if target_modules is None else target_modules)
    if isinstance(target_modules, str):
        raise TypeError(
            f"target_modules={target_modules!r} is a string; pass a list of module names, e.g. ['q_proj', 'v_proj']."
        )
    parameters = list(target_parameters or [])
    if not modules and not parameters:
        raise ValueError(
            "target_modules is empty; name at least one module to adapt, e.g. ['q_proj', 'v_proj']."
        )
    roles = dict(roles or {})

    # Per-role rank and alpha; alpha follows the rank unless given (see module docs).
    rank = {"attention": attention_r or r, "mlp": mlp_r or r}
    alpha = {
        "attention": attention_alpha if attention_alpha is not None else lora_alpha * rank["attention"] / r,
        "mlp": mlp_alpha if mlp_alpha is not None else lora_alpha * rank["mlp"] / r,
    }
    rank_pattern, alpha_pattern = {}, {}
    for name in modules + [p.split(f".{layers_pattern}.", 1)[-1].split(".", 1)[-1] for p in parameters]:
        role = roles.get(name) or guess_role(name)
        part = "attention" if role == "attention" else "mlp"  # experts (and routers) take the MLP rank
        key = re.escape(name)
        if rank[part] != r:
            rank_pattern[key] = rank[part]
        if alpha[part] != lora_alpha:
            alpha_pattern[key] = alpha[part]

    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=modules or None,
        target_parameters=parameters or None,
        layers_to_transform=layers if modules else None,
        layers_pattern=layers_pattern if modules else None,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        bias="none",
        task_type=task_type,
        **lora_kwargs,
    )


def refuse_peft_model(model: nn.Module) -> None:
    """A model that PEFT already wraps would get adapters on adapters: refuse, say what to pass."""
    if type(model).__module__.startswith("peft."):
        raise TypeError(
            f"model is already a PEFT model ({type(model).__name__}); pass the base model instead "
            f"(peft_model.get_base_model(), or peft_model.merge_and_unload() to keep its adapter's effect)."
        )


def apply_aletheia_lora(
    model: nn.Module,
    selected_layers: Sequence[int],
    r: int = 16,
    lora_alpha: float = 32,
    attention_r: int | None = None,
    mlp_r: int | None = None,
    attention_alpha: float | None = None,
    mlp_alpha: float | None = None,
    lora_dropout: float = 0.0,
    target_modules: Sequence[str] | None = None,
    task_type: str | None = "CAUSAL_LM",
    *,
    layers_path: str | None = None,
    include_router: bool = False,
    **lora_kwargs,
) -> LoraConfig:
    """LoraConfig adapting ``selected_layers`` of ``model``; pass it to ``peft.get_peft_model``.

    Target modules are read from the architecture (every Linear/Conv1D of the block, 3-D
    MoE expert tensors via ``target_parameters``; routers only with ``include_router``)
    unless ``target_modules`` names them. Each given name must match an adaptable module
    in the selected layers. Keyword-only extras go to ``LoraConfig`` (``use_dora=True``,
    ``use_rslora=True``, ``init_lora_weights="gaussian"``; DoRA is refused on MoE expert tensors).
    Only the decoder blocks are adapted, also in a multimodal wrapper (see ``_anchor_on_blocks``).
    The model itself is not modified.
    """
    refuse_peft_model(model)
    arch = find_blocks(model, layers_path)
    layers = _check_layers(selected_layers, arch.num_layers)
    available: list[Target] = []
    for i in layers:
        for t in arch.targets_of(i):
            if t not in available:
                available.append(t)

    if target_modules is None:
        chosen = [t for t in available if include_router or t.role != "router"]
    else:
        if isinstance(target_modules, str):
            target_modules = [target_modules]
        chosen = []
        for name in target_modules:
            hits = [t for t in available if t.matches(name)]
            if not hits:
                names = sorted({t.name for t in available})
                raise ValueError(
                    f"target_modules entry {name!r} matches no adaptable module in layers {layers} of "
                    f"{type(model).__name__}; available: {names}."
                )
            chosen += [t for t in hits if t not in chosen]

    if any(t.kind == "conv1d" for t in chosen):  # GPT-2 style weights are stored (in, out)
        lora_kwargs.setdefault("fan_in_fan_out", True)
    modules = [t.name for t in chosen if t.is_module]
    parameters = [f"{arch.blocks_path}.{i}.{t.name}" for i in layers for t in chosen if not t.is_module]
    parameters = [p for p in parameters if _has_parameter(model, p)]
    if lora_kwargs.get("use_dora") and parameters:
        raise ValueError(
            f"use_dora=True: PEFT has no DoRA for MoE expert tensors ({', '.join(parameters[:2])}, ...); name the "
            f"linear modules to adapt with target_modules, or train without DoRA."
        )
    config = aletheia_lora_config(
        layers,
        r=r,
        lora_alpha=lora_alpha,
        attention_r=attention_r,
        mlp_r=mlp_r,
        attention_alpha=attention_alpha,
        mlp_alpha=mlp_alpha,
        lora_dropout=lora_dropout,
        target_modules=modules,
        task_type=task_type,
        layers_pattern=arch.layers_pattern,
        roles={t.name: t.role for t in chosen},
        target_parameters=parameters,
        num_layers=arch.num_layers,
        **lora_kwargs,
    )
    return _anchor_on_blocks(model, arch, config)


def _anchor_on_blocks(model: nn.Module, arch: Architecture, config: LoraConfig) -> LoraConfig:
    """``config`` adapting nothing outside ``arch``'s blocks.

    PEFT matches ``layers_pattern`` as ``<pattern>.<index>.`` anywhere in a module's path, so on a multimodal
    wrapper (blocks at ``model.language_model.layers``) the short pattern ``layers`` also picks the vision
    tower's ``encoder.layers.<index>.self_attn.q_proj``. Where PEFT's own matcher finds such a module, the
    pattern becomes the escaped block path (PEFT reads it as a regex), which only the language model's
    blocks match; text-only models keep the short pattern."""
    if config.layers_to_transform is None:
        return config
    inside = arch.blocks_path + "."

    def stray() -> list[str]:
        names = (name for name, _ in model.named_modules() if not name.startswith(inside))
        return [name for name in names if check_target_module_exists(config, name)]

    if stray():
        config.layers_pattern = re.escape(arch.blocks_path)
        left = stray()
        if left:  # pragma: no cover - the escaped block path matches only the blocks
            raise ValueError(
                f"LoRA would also adapt {left[:3]} outside {arch.blocks_path}; pass layers_path."
            )
    return config


def _has_parameter(model: nn.Module, path: str) -> bool:
    module_path, _, name = path.rpartition(".")
    try:
        return isinstance(getattr(model.get_submodule(module_path), name, None), nn.Parameter)
    except AttributeError:
        return False


def _out_features(module: nn.Module) -> int:
    """A Linear's output features; a transformers Conv1D stores its weight as (in, out)."""
    return module.out_features if isinstance(module, nn.Linear) else module.weight.shape[1]


def lora_param_count(model: nn.Module, lora_config: LoraConfig, arch: Architecture | None = None) -> int:
    """Parameters LoRA adds under ``lora_config``, from the weight shapes (no model change).

    A Linear (out, in) at rank r adds r * (in + out); a 3-D expert tensor (E, out, in) adds
    r * E * (in + out), as PEFT's ParamWrapper does.
    """
    arch = arch or find_blocks(model)
    prefix = arch.blocks_path
    total = 0
    layers = lora_config.layers_to_transform or []
    for name in sorted(lora_config.target_modules or []):
        for i in layers:
            full = f"{prefix}.{i}.{name}"
            # the layer's shape (a 4-bit weight is packed)
            out_features, in_features = weight_shape(arch.blocks[i].get_submodule(name))
            rank = lora_config.rank_pattern.get(
                get_pattern_key(lora_config.rank_pattern.keys(), full), lora_config.r
            )
            total += rank * (out_features + in_features)
            if lora_config.use_dora:  # DoRA's magnitude vector: one per output feature
                total += _out_features(arch.blocks[i].get_submodule(name))
    for path in lora_config.target_parameters or []:
        module_path, _, pname = path.rpartition(".")
        param = getattr(model.get_submodule(module_path), pname)
        rank = lora_config.rank_pattern.get(
            get_pattern_key(lora_config.rank_pattern.keys(), path), lora_config.r
        )
        experts = param.shape[0] if param.dim() == 3 else 1
        total += rank * experts * (param.shape[-1] + param.shape[-2])
    return total
