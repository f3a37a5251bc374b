"""Model shapes for benchmarks: configs with the published architecture numbers, no weights.

``preset_config("llama-3.1-8b")`` is a ``transformers`` config with the hidden size,
intermediate size, layer count, attention / key-value heads, head size and vocabulary of
Llama-3.1-8B; ``AutoModelForCausalLM.from_config`` turns it into a randomly initialised
model with the real shapes (the speed of a step depends on the shapes, not on the values).

RoPE variants are kept where the config expresses them simply (Llama-3.1's ``llama3``
scaling); Phi-3.5's ``longrope`` factor tables are left out. Neither changes the compute.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Preset:
    """One published architecture: the ``transformers`` model type and its config values.

    ``params`` is the published parameter count (embeddings included), for orientation and
    as a check that the numbers were copied right.
    """

    name: str
    model_type: str
    hub_id: str
    params: int
    config: dict[str, Any] = field(default_factory=dict)


def _llama_like(hidden, intermediate, layers, heads, kv_heads, vocab, **extra) -> dict[str, Any]:
    return {
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        **extra,
    }


_QWEN = {"rms_norm_eps": 1e-6, "use_sliding_window": False, "rope_parameters": {"rope_theta": 1e6}}

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "smollm2-135m",
            "llama",
            "HuggingFaceTB/SmolLM2-135M",
            134_515_008,
            _llama_like(
                576,
                1536,
                30,
                9,
                3,
                49152,
                tie_word_embeddings=True,
                max_position_embeddings=8192,
                rms_norm_eps=1e-5,
                rope_parameters={"rope_theta": 100000.0},
            ),
        ),  # fmt: skip
        Preset(
            "qwen2.5-0.5b",
            "qwen2",
            "Qwen/Qwen2.5-0.5B",
            494_032_768,
            _llama_like(
                896, 4864, 24, 14, 2, 151936, tie_word_embeddings=True, max_position_embeddings=32768, **_QWEN
            ),
        ),  # fmt: skip
        Preset(
            "qwen2.5-1.5b",
            "qwen2",
            "Qwen/Qwen2.5-1.5B",
            1_543_714_304,
            _llama_like(
                1536,
                8960,
                28,
                12,
                2,
                151936,
                tie_word_embeddings=True,
                max_position_embeddings=32768,
                **_QWEN,
            ),
        ),  # fmt: skip
        Preset(
            "qwen2.5-7b",
            "qwen2",
            "Qwen/Qwen2.5-7B",
            7_615_616_512,
            _llama_like(
                3584,
                18944,
                28,
                28,
                4,
                152064,
                tie_word_embeddings=False,
                max_position_embeddings=131072,
                **_QWEN,
            ),
        ),  # fmt: skip
        Preset(
            "llama-3.1-8b",
            "llama",
            "meta-llama/Llama-3.1-8B",
            8_030_261_248,
            _llama_like(
                4096,
                14336,
                32,
                32,
                8,
                128256,
                tie_word_embeddings=False,
                max_position_embeddings=131072,
                rms_norm_eps=1e-5,
                rope_parameters={
                    "rope_type": "llama3",
                    "rope_theta": 500000.0,
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192,
                },
            ),
        ),  # fmt: skip
        Preset(
            "mistral-7b",
            "mistral",
            "mistralai/Mistral-7B-v0.3",
            7_248_023_552,
            _llama_like(
                4096,
                14336,
                32,
                32,
                8,
                32768,
                head_dim=128,
                tie_word_embeddings=False,
                max_position_embeddings=32768,
                rms_norm_eps=1e-5,
                sliding_window=None,
                rope_parameters={"rope_theta": 1e6},
            ),
        ),  # fmt: skip
        Preset(
            "gemma-2-2b",
            "gemma2",
            "google/gemma-2-2b",
            2_614_341_888,
            _llama_like(
                2304,
                9216,
                26,
                8,
                4,
                256000,
                head_dim=256,
                hidden_activation="gelu_pytorch_tanh",
                tie_word_embeddings=True,
                max_position_embeddings=8192,
                rms_norm_eps=1e-6,
                query_pre_attn_scalar=256,
                sliding_window=4096,
                final_logit_softcapping=30.0,
                attn_logit_softcapping=50.0,
            ),
        ),  # fmt: skip
        Preset(
            "phi-3.5-mini",
            "phi3",
            "microsoft/Phi-3.5-mini-instruct",
            3_821_079_552,
            _llama_like(
                3072,
                8192,
                32,
                32,
                32,
                32064,
                tie_word_embeddings=False,
                max_position_embeddings=4096,
                rms_norm_eps=1e-5,
            ),
        ),  # fmt: skip
        Preset(
            "mixtral-8x7b",
            "mixtral",
            "mistralai/Mixtral-8x7B-v0.1",
            46_702_792_704,
            _llama_like(
                4096,
                14336,
                32,
                32,
                8,
                32000,
                head_dim=128,
                num_local_experts=8,
                num_experts_per_tok=2,
                tie_word_embeddings=False,
                max_position_embeddings=32768,
                rms_norm_eps=1e-5,
                sliding_window=None,
                rope_parameters={"rope_theta": 1e6},
            ),
        ),  # fmt: skip
    )
}


def preset_names() -> list[str]:
    """The known preset names, sorted."""
    return sorted(PRESETS)


def get_preset(name: str) -> Preset:
    """The preset called ``name`` (case-insensitive); ``ValueError`` listing the presets otherwise."""
    key = str(name).strip().lower()
    if key not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(preset_names())}.")
    return PRESETS[key]


def preset_config(name: str, *, num_layers: int | None = None, **overrides: Any):
    """A ``transformers`` config with the shapes of preset ``name``.

    Args:
        name: one of :func:`preset_names` (e.g. ``"llama-3.1-8b"``).
        num_layers: build fewer (or more) decoder blocks than the published model, for quick
            runs; every block keeps the published shape.
        overrides: any other config field (e.g. ``attn_implementation="eager"``).
    """
    from transformers import AutoConfig

    preset = get_preset(name)
    values = dict(preset.config)
    if num_layers is not None:
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(
                f"num_layers={num_layers!r}; it must be an integer >= 1 (or None for the published count)."
            )
        values["num_hidden_layers"] = num_layers
    values.update(overrides)
    values.setdefault("use_cache", False)  # training-style forward passes never need the KV cache
    return AutoConfig.for_model(preset.model_type, **values)
