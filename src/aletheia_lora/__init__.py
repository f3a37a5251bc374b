"""aletheia-lora: put LoRA adapters only on the transformer layers that matter for the task.

from aletheia_lora import gradient_probe, select_layers, apply_aletheia_lora
scores = gradient_probe(model, dataset)              # one score per decoder block
layers = select_layers(scores, top_pct=50)           # the top half, ascending
config = apply_aletheia_lora(model, layers, r=16)    # a peft.LoraConfig
"""

from .architecture import Architecture, Target, block_targets, find_blocks
from .config import aletheia_lora_config, apply_aletheia_lora
from .costmodel import predict_speedup
from .probe import gradient_probe
from .scores import LayerScores
from .selection import select_layers
from .training import AletheiaConfig, AletheiaPlan, prepare_model

__version__ = "0.1.0"

__all__ = [
    "AletheiaConfig",
    "AletheiaPlan",
    "prepare_model",
    "Architecture",
    "LayerScores",
    "Target",
    "aletheia_lora_config",
    "apply_aletheia_lora",
    "block_targets",
    "find_blocks",
    "gradient_probe",
    "predict_speedup",
    "select_layers",
]
