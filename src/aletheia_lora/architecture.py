"""Find the decoder block stack of a causal LM and the adaptable weights inside each block.

Every supported family is described by two facts:

* where its blocks live (``model.layers``, ``transformer.h``, ``gpt_neox.layers``, ...), and
* which weights inside a block LoRA can adapt, each with a *role*:
  ``attention``, ``mlp``, ``expert`` (MoE experts, counted as MLP for ``mlp_r``) or
  ``router`` (MoE gates; probed but not adapted by default).

The block paths are one small table; roles come from module names, which are consistent
across families (``self_attn``/``attn``/``attention`` vs ``mlp``/``fc1``/``dense_h_to_4h``).
An unknown model falls back to the largest ``nn.ModuleList`` of identical blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

try:  # GPT-2 style transposed linear layers
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers always ships it today
    Conv1D = ()  # type: ignore[assignment]

# Where the decoder blocks live, per family (first match wins). Unknown models fall back to
# the largest ModuleList of identical blocks (see `find_blocks`).
KNOWN_BLOCK_PATHS: tuple[str, ...] = (
    "model.layers",  # Llama, Qwen2/3, Mistral, Gemma 1/2/3, Phi, Phi3, StableLM, Mixtral, Qwen2-MoE
    "model.decoder.layers",  # OPT
    "model.language_model.layers",  # multimodal wrappers (Gemma3, Llava-style)
    "transformer.h",  # GPT-2, Falcon, Bloom, GPT-J
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "transformer.blocks",  # MPT
    "model.transformer.h",
)

ROLES = ("attention", "mlp", "expert", "router")
_ATTENTION_WORDS = ("attn", "attention")
_ROUTER_NAMES = ("gate", "router", "shared_expert_gate")


@dataclass(frozen=True)
class Target:
    """One adaptable weight inside a block.

    name:  path relative to the block (``"self_attn.q_proj"``; for 3-D expert parameters
           the parameter path, ``"mlp.experts.gate_up_proj"``).
    role:  ``attention`` | ``mlp`` | ``expert`` | ``router``.
    kind:  ``linear`` (nn.Linear), ``conv1d`` (transformers Conv1D, weight stored in x out)
           or ``parameter`` (a 3-D expert tensor adapted with PEFT ``target_parameters``).
    """

    name: str
    role: str
    kind: str

    @property
    def is_module(self) -> bool:
        return self.kind in ("linear", "conv1d")

    def matches(self, name: str) -> bool:
        """Whether a ``target_modules`` entry names this weight: its path, or a dotted suffix of it."""
        return self.name == name or self.name.endswith("." + name)


@dataclass(frozen=True)
class Architecture:
    """The block stack of a model and the adaptable weights of its blocks.

    ``targets`` are those of block 0; ``targets_of(i)`` gives any block's (blocks can
    differ, e.g. MoE models with dense layers in between).
    """

    blocks_path: str
    blocks: nn.ModuleList

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def layers_pattern(self) -> str:
        """The last component of the block path, as PEFT's ``layers_pattern`` wants it."""
        return self.blocks_path.rsplit(".", 1)[-1]

    def targets_of(self, index: int) -> list[Target]:
        return block_targets(self.blocks[index])

    @property
    def targets(self) -> list[Target]:
        return self.targets_of(0)

    def module_names(self, index: int, *, include_router: bool = False) -> list[str]:
        """Full module paths of the adaptable Linear-like modules of block ``index``."""
        return [
            f"{self.blocks_path}.{index}.{t.name}"
            for t in self.targets_of(index)
            if t.is_module and (include_router or t.role != "router")
        ]


def _unwrap(model: nn.Module) -> tuple[nn.Module, str]:
    """Look through a PEFT wrapper: returns (inner model, prefix of its names in `model`)."""
    prefix = ""
    inner = model
    for attr in ("base_model", "model"):  # PeftModel.base_model (LoraModel).model
        if type(inner).__module__.startswith("peft.") and hasattr(inner, attr):
            inner = getattr(inner, attr)
            prefix += attr + "."
    return inner, prefix


def _get(module: nn.Module, path: str) -> nn.Module | None:
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def find_blocks(model: nn.Module, layers_path: str | None = None) -> Architecture:
    """Locate the decoder block stack.

    ``layers_path`` (e.g. ``"model.layers"``) overrides detection. Without it, the known
    paths are tried, then the largest ``nn.ModuleList`` whose children are all of one class.
    Raises ``ValueError`` if nothing is found, saying how to pass ``layers_path``.
    """
    inner, prefix = _unwrap(model)
    if layers_path is not None:
        blocks = _get(model, layers_path)
        if blocks is None and prefix:
            blocks, layers_path = _get(inner, layers_path), layers_path
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            raise ValueError(
                f"layers_path={layers_path!r} does not name a non-empty nn.ModuleList in "
                f"{type(model).__name__}; pass the dotted path of the decoder blocks, e.g. "
                f"layers_path='model.layers'."
            )
        return Architecture(layers_path, blocks)

    for path in KNOWN_BLOCK_PATHS:
        blocks = _get(inner, path)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return Architecture(path, blocks)

    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in inner.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(child) for child in module}) == 1 and block_targets(module[0]):
                if best is None or len(module) > best[0]:
                    best = (len(module), name, module)
    if best is None:
        raise ValueError(
            f"could not find the decoder block stack of {type(model).__name__}: no nn.ModuleList of "
            f"identical blocks with Linear layers. Pass its dotted path, e.g. layers_path='model.layers'."
        )
    return Architecture(best[1], best[2])


def block_targets(block: nn.Module) -> list[Target]:
    """The adaptable weights of one block: every Linear / Conv1D, and 3-D expert parameters.

    Routers (an MoE ``gate``/``router`` beside ``experts``) get role ``router``.
    """
    names = {}  # block-relative name -> module, looking through PEFT wrappers already applied
    for name, module in block.named_modules():
        parts = name.split(".")
        if not name or any(p.startswith("lora_") for p in parts) or _is_peft_wrapper(module):
            continue
        names[".".join(p for p in parts if p != "base_layer")] = module
    targets: list[Target] = []
    for name, module in names.items():
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        has_experts = f"{parent}.experts" in names if parent else "experts" in names
        if isinstance(module, nn.Linear) or (Conv1D and isinstance(module, Conv1D)):
            kind = "linear" if isinstance(module, nn.Linear) else "conv1d"
            leaf = name.rsplit(".", 1)[-1]
            if leaf in _ROUTER_NAMES and (has_experts or "Router" in type(module).__name__):
                role = "router"
            else:
                role = guess_role(name)
            targets.append(Target(name, role, kind))
        elif "Router" in type(module).__name__ or (name.rsplit(".", 1)[-1] in _ROUTER_NAMES and has_experts):
            # transformers 5 MoE routers are custom modules holding a 2-D weight
            if isinstance(getattr(module, "weight", None), nn.Parameter):
                targets.append(Target(f"{name}.weight", "router", "parameter"))
        else:
            for pname, param in module.named_parameters(recurse=False):
                # a ZeRO-3 partitioned tensor is flat here; its real shape is ds_shape
                if len(getattr(param, "ds_shape", param.shape)) == 3 and param.is_floating_point():
                    targets.append(Target(f"{name}.{pname}", "expert", "parameter"))
    return targets


_ATTENTION_LEAVES = frozenset(
    {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "qkv_proj",
        "query_key_value",
        "c_attn",
        "out_proj",
        "Wqkv",
        "wqkv",
    }
)


def _is_peft_wrapper(module: nn.Module) -> bool:
    return hasattr(module, "base_layer") and type(module).__module__.startswith("peft.")


def guess_role(name: str) -> str:
    """Role of a weight from its path alone (``"self_attn.q_proj"`` -> ``"attention"``)."""
    parts = name.split(".")
    if any("expert" in p for p in parts):
        return "expert"
    if parts[-1] in _ATTENTION_LEAVES or any(word in p for p in parts for word in _ATTENTION_WORDS):
        return "attention"
    return "mlp"


def probed_parameters(block: nn.Module, params: str) -> dict[str, torch.nn.Parameter]:
    """Block-relative name -> parameter for the tensors the probe scores.

    ``params="lora-targets"``: the weight of every adaptable module (biases and norms
    excluded), 3-D expert tensors and router weights. ``params="all"``: every
    floating-point parameter of the block (the published definition).
    """
    if params == "all":  # quantized (4/8-bit) linear weights included: they are the block's weights
        return {n: p for n, p in block.named_parameters() if p.is_floating_point() or is_quantized_weight(p)}
    if params != "lora-targets":
        raise ValueError(f"params={params!r}; use 'lora-targets' (default) or 'all'.")
    out: dict[str, torch.nn.Parameter] = {}
    for t in block_targets(block):
        if t.is_module:
            out[f"{t.name}.weight"] = _get(block, t.name).weight  # type: ignore[union-attr]
        else:
            module_path, _, pname = t.name.rpartition(".")
            out[t.name] = getattr(_get(block, module_path), pname)
    return out


def is_quantized_weight(param: torch.Tensor) -> bool:
    """A bitsandbytes 4-bit (``Params4bit``, packed) or 8-bit (``Int8Params``) weight."""
    return type(param).__name__ in ("Params4bit", "Int8Params")


def weight_shape(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of a Linear, also when its weight is packed (bitsandbytes 4-bit);
    a transformers Conv1D's weight shape as stored, ``(in, out)``."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    return tuple(module.weight.shape)  # type: ignore[return-value]


def dense_weight(param: torch.Tensor) -> torch.Tensor:
    """``param`` as a floating-point tensor: itself, or a bitsandbytes 4/8-bit weight dequantized."""
    if param.is_floating_point():
        return param
    quant_state = getattr(param, "quant_state", None)
    if quant_state is not None:  # Params4bit
        import bitsandbytes.functional as bnb_functional

        return bnb_functional.dequantize_4bit(param.data, quant_state)
    scb = getattr(param, "SCB", None)
    if scb is not None:  # Int8Params: row-wise absmax scaling
        return param.data.float() * scb.float().unsqueeze(1) / 127
    raise TypeError(
        f"cannot read a {type(param).__name__} of dtype {param.dtype} as a floating-point weight."
    )


def role_of(param_name: str, targets: list[Target]) -> str:
    """Role of a probed parameter name (block-relative); norms and biases are ``other``."""
    for t in targets:
        if param_name == t.name or param_name == f"{t.name}.weight":
            return t.role
    return "other"
