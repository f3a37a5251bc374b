"""aletheia-lora: put LoRA adapters only on the transformer layers that matter for the task.

from aletheia_lora import gradient_probe, select_layers, apply_aletheia_lora
scores = gradient_probe(model, dataset)              # one score per decoder block
layers = select_layers(scores, top_pct=50)           # the top half, ascending
config = apply_aletheia_lora(model, layers, r=16)    # a peft.LoraConfig

The names below are imported on first use, so `import aletheia_lora` (and the CLI's
``--help``) does not pay for torch, transformers and peft until they are needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "Architecture": "architecture",
    "Target": "architecture",
    "block_targets": "architecture",
    "find_blocks": "architecture",
    "aletheia_lora_config": "lora_config",
    "apply_aletheia_lora": "lora_config",
    "predict_speedup": "costmodel",
    "gradient_probe": "probe",
    "LayerScores": "scores",
    "select_layers": "selection",
    "AletheiaConfig": "settings",
    "AletheiaPlan": "plan",
    "prepare_model": "plan",
}

__all__ = [
    "AletheiaConfig",
    "AletheiaPlan",
    "Architecture",
    "LayerScores",
    "Target",
    "aletheia_lora_config",
    "apply_aletheia_lora",
    "block_targets",
    "find_blocks",
    "gradient_probe",
    "predict_speedup",
    "prepare_model",
    "select_layers",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'aletheia_lora' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:  # for type checkers and IDEs
    from .architecture import Architecture, Target, block_targets, find_blocks
    from .costmodel import predict_speedup
    from .lora_config import aletheia_lora_config, apply_aletheia_lora
    from .plan import AletheiaPlan, prepare_model
    from .probe import gradient_probe
    from .scores import LayerScores
    from .selection import select_layers
    from .settings import AletheiaConfig
