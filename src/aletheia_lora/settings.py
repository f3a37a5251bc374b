"""The settings every command shares, declared once and validated once.

Each group is a dataclass whose fields carry their help text in ``metadata`` (the
``transformers.HfArgumentParser`` convention, so every field is a command-line flag of the same
name) and whose checks run in ``__post_init__``. A command's settings are the groups it needs,
composed by inheritance, plus its own fields:

=====================  ===================================================================
group                  fields
=====================  ===================================================================
``ModelSettings``      model, dtype, trust_remote_code, load_in_4bit/8bit and the bnb_4bit_* flags
``DataSettings``      data, format, max_length, ... (what ``train`` and ``probe`` read)
``BudgetSettings``     top_pct, top_k, target_speedup (how many layers get LoRA)
``ProbeSettings``      probe_batches, probe_batch_size, probe_max_length, probe_params, probe_method, score
``LoraSettings``       r, lora_alpha, attention_r, mlp_r, mlp_rank_factor, alphas, dropout, targets, DoRA, rsLoRA, init
``OutputSettings``     overwrite_output_dir, quiet (``OutputDirSettings``: + output_dir)
``ScheduleTuning``     freeze_interval, freeze_threshold, freeze_min_steps, freeze_max_frozen, max_drop_rate
``ScheduleSettings``   + schedule (static, freeze, drop), drop_target_speedup (``train``)
=====================  ===================================================================

``AletheiaConfig`` (probe + selection + LoRA, the settings of :func:`prepare_model`) is
``BudgetSettings + ProbeSettings + LoraSettings`` plus the strategy and the seed. Because every
group checks itself when it is built, a command rejects a bad value while parsing its flags,
before any model is loaded, with the same message whichever command it is.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .contribution import DEFAULT_LR as WARMUP_LR
from .contribution import NAME as CONTRIBUTION
from .export import EXPORT_FILES, check_format
from .probe import METHODS, PARAMS, SIGNALS
from .selection import STRATEGIES

# Accepted --dtype spellings -> the name transformers and torch use.
DTYPES = {
    "auto": "auto",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
    "fp32": "float32",
    "float32": "float32",
}
# --init_lora_weights -> PEFT's init_lora_weights: the initializations that need no data and leave the base weights
# as they are (PEFT 0.21, peft/tuners/lora/config.py). The others are refused, each with its reason.
INIT_LORA_WEIGHTS: dict[str, bool | str] = {
    "true": True,
    "false": False,
    "gaussian": "gaussian",
    "orthogonal": "orthogonal",
}
_REFUSED_INITS = {
    "pissa": "PiSSA rewrites the base weights, so the adapter aletheia-lora saves would not load on the original base",
    "olora": "OLoRA rewrites the base weights, so the adapter aletheia-lora saves would not load on the original base",
    "loftq": "LoftQ needs a loftq_config (it quantizes the base itself), which aletheia-lora does not pass",
    "eva": "EVA initializes from activations of the training data, which aletheia-lora does not pass to PEFT",
    "corda": "CorDA initializes from activations of the training data, which aletheia-lora does not pass to PEFT",
    "lora_ga": "LoRA-GA initializes from gradients of the training data, which aletheia-lora does not pass to PEFT",
    "mica": "MiCA freezes B and trains A alone, which the probe's ranks and the parameter counts do not model",
}
# bitsandbytes' 4-bit data types (--bnb_4bit_quant_type).
QUANT_TYPES = ("nf4", "fp4")


class Settings:
    """Base of every settings group: ``__post_init__`` runs each group's ``_check``, base first."""

    def __post_init__(self) -> None:
        for cls in reversed(type(self).__mro__):
            check = cls.__dict__.get("_check")
            if check is not None:
                check(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def at_least(obj: Any, minimum: int, *names: str, unset_ok: bool = False) -> None:
    """Raise ``ValueError`` naming the field unless each of ``obj``'s fields ``names`` is >= ``minimum``."""
    for name in names:
        value = getattr(obj, name)
        if value is None and unset_ok:
            continue
        if value < minimum:
            also = " (or unset)" if unset_ok else ""
            raise ValueError(f"{name}={value}; it must be >= {minimum}{also}.")


# --------------------------------------------------------------------------- groups


@dataclass(kw_only=True)
class ModelSettings(Settings):
    model: str | None = field(
        default=None,
        metadata={
            "help": "Hub id, local folder, .gguf file, or empty for the embedded SmolLM2-135M-Instruct."
        },
    )
    dtype: str | None = field(
        default=None,
        metadata={"help": "Weight dtype: auto, bf16, fp16 or fp32 (default: the checkpoint's; bench: bf16 "
                  "on a GPU, fp32 on a CPU)."},
    )  # fmt: skip
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the hub."})
    load_in_4bit: bool = field(
        default=False,
        metadata={"help": "QLoRA: load the base model's linear weights in 4 bits (bitsandbytes; pip install "
                  "'aletheia-lora[qlora]'), prepared with PEFT's prepare_model_for_kbit_training."},
    )  # fmt: skip
    load_in_8bit: bool = field(
        default=False, metadata={"help": "Load the base model's linear weights in 8 bits (bitsandbytes)."}
    )
    bnb_4bit_quant_type: str = field(
        default="nf4", metadata={"help": "4-bit data type: nf4 or fp4.", "choices": list(QUANT_TYPES)}
    )
    bnb_4bit_use_double_quant: bool = field(
        default=True, metadata={"help": "Quantize the 4-bit scales too (double quantization)."}
    )
    bnb_4bit_compute_dtype: str | None = field(
        default=None,
        metadata={"help": "dtype the 4-bit layers compute in: bf16, fp16 or fp32 (default: bf16 on a GPU, fp32 on "
                  "a CPU)."},
    )  # fmt: skip

    def _check(self) -> None:
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}; use one of {sorted(DTYPES)}.")
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("load_in_4bit and load_in_8bit are both set; pass one of them.")
        if self.bnb_4bit_quant_type not in QUANT_TYPES:
            raise ValueError(
                f"bnb_4bit_quant_type={self.bnb_4bit_quant_type!r}; use one of {list(QUANT_TYPES)}."
            )
        if (
            self.bnb_4bit_compute_dtype is not None
            and DTYPES.get(self.bnb_4bit_compute_dtype, "auto") == "auto"
        ):
            raise ValueError(
                f"bnb_4bit_compute_dtype={self.bnb_4bit_compute_dtype!r}; use bf16, fp16 or fp32."
            )

    def quantization_kwargs(self) -> dict[str, Any]:
        """The quantization keyword arguments of :func:`aletheia_lora.models.load_model` (empty: none)."""
        if not (self.load_in_4bit or self.load_in_8bit):
            return {}
        compute = None if self.bnb_4bit_compute_dtype is None else DTYPES[self.bnb_4bit_compute_dtype]
        return {"quantization": "4bit" if self.load_in_4bit else "8bit", "bnb_4bit_quant_type": self.bnb_4bit_quant_type,
                "bnb_4bit_use_double_quant": self.bnb_4bit_use_double_quant, "bnb_4bit_compute_dtype": compute}  # fmt: skip

    @property
    def torch_dtype_name(self) -> str | None:
        """``dtype`` as transformers names it (``"bfloat16"``, ``"auto"``), or ``None``."""
        return None if self.dtype is None else DTYPES[self.dtype]


@dataclass(kw_only=True)
class BudgetSettings(Settings):
    top_pct: float = field(default=50, metadata={"help": "Percentage of layers to adapt, in (0, 100]."})
    top_k: int | None = field(
        default=None, metadata={"help": "Adapt exactly this many layers (overrides top_pct)."}
    )
    target_speedup: float | None = field(
        default=None,
        metadata={"help": "depth-aware only: the least predicted speedup over all-layer LoRA (e.g. 1.5); "
                  "top_pct/top_k then cap the number of layers."},
    )  # fmt: skip

    def _check(self) -> None:
        if not 0 < self.top_pct <= 100:
            raise ValueError(f"top_pct={self.top_pct}; it must be a percentage in (0, 100], e.g. 50.")
        at_least(self, 1, "top_k", unset_ok=True)
        if self.target_speedup is not None and not self.target_speedup >= 1:
            raise ValueError(
                f"target_speedup={self.target_speedup}; it must be >= 1 (1.5 = 1.5x faster than all-layer LoRA)."
            )


SCORES = (*SIGNALS, CONTRIBUTION)  # the gradient probe's signals, and the warm-up's


@dataclass(kw_only=True)
class ProbeSettings(Settings):
    probe_batches: int = field(default=5, metadata={"help": "Forward+backward passes of the gradient probe."})
    probe_batch_size: int = field(default=1, metadata={"help": "Examples per probe batch."})
    probe_max_length: int | None = field(
        default=None,
        metadata={"help": "Truncate probe examples to this many tokens (default: as tokenized)."},
    )
    probe_params: str = field(
        default="lora-targets",
        metadata={"help": "What the probe scores: 'lora-targets' (the weights LoRA adapts) or 'all' (every "
                  "parameter of the block, norms included: the published definition).", "choices": list(PARAMS)},
    )  # fmt: skip
    probe_method: str = field(
        default="onepass",
        metadata={"help": "'onepass' (hooks, no weight gradients) or 'chunked' (reference).", "choices": list(METHODS)},
    )  # fmt: skip
    score: str = field(
        default="grad-norm",
        metadata={"help": "The probe signal layers are ranked by: 'grad-norm' (sum of gradient norms, the published "
                  "score), 'relative' (gradient norm / weight norm), 'lora-energy' (the part of each gradient a "
                  "LoRA of the planned rank can hold), 'coherence' (how much the probe batches' gradients agree; "
                  "needs probe_batches >= 2) or 'contribution' (the loss reduction each layer's adapter made in a "
                  "probe_batches-step all-layer LoRA warm-up, which kept layers continue from). See "
                  "docs/method.md.", "choices": list(SCORES)},
    )  # fmt: skip
    warmup_lr: float = field(
        default=WARMUP_LR,
        metadata={"help": "AdamW learning rate of the all-layer LoRA warm-up of --score contribution."},
    )

    def _check(self) -> None:
        at_least(self, 1, "probe_batches", "probe_batch_size")
        at_least(self, 1, "probe_max_length", unset_ok=True)
        if self.probe_params not in PARAMS:
            raise ValueError(f"probe_params={self.probe_params!r}; use one of {list(PARAMS)}.")
        if self.probe_method not in METHODS:
            raise ValueError(f"probe_method={self.probe_method!r}; use one of {list(METHODS)}.")
        if self.score not in SCORES:
            raise ValueError(f"score={self.score!r}; use one of {list(SCORES)}.")
        if not self.warmup_lr > 0:
            raise ValueError(f"warmup_lr={self.warmup_lr}; the warm-up's learning rate must be > 0.")
        if self.score == "coherence" and self.probe_batches < 2:
            raise ValueError(
                f"score='coherence' with probe_batches={self.probe_batches}: with one batch every layer's "
                f"coherence is 1; use probe_batches >= 2."
            )


@dataclass(kw_only=True)
class LoraSettings(Settings):
    r: int = field(default=16, metadata={"help": "LoRA rank for weights without a role-specific rank."})
    lora_alpha: float = field(default=32, metadata={"help": "LoRA alpha; the update is scaled by alpha / r."})
    attention_r: int | None = field(
        default=None, metadata={"help": "LoRA rank of attention weights (default: r)."}
    )
    mlp_r: int | None = field(
        default=None, metadata={"help": "LoRA rank of MLP and expert weights (default: mlp_rank_factor x r)."}
    )
    mlp_rank_factor: float = field(
        default=4,
        metadata={"help": "Without mlp_r, MLP and expert weights get rank mlp_rank_factor x r (default 4: attention "
                  "r=16, MLP r=64, the best arm of the quality study; 1 for uniform ranks)."},
    )  # fmt: skip
    attention_alpha: float | None = field(
        default=None, metadata={"help": "Alpha of attention weights (default: keeps alpha/r = lora_alpha/r)."}
    )
    mlp_alpha: float | None = field(
        default=None, metadata={"help": "Alpha of MLP weights (default: keeps alpha/r = lora_alpha/r)."}
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Block-relative module names to adapt (default: from the architecture)."},
    )
    layers_path: str | None = field(
        default=None,
        metadata={"help": "Dotted path of the decoder blocks, when detection fails (model.layers)."},
    )
    truncate_backward: bool = field(
        default=True,
        metadata={"help": "Never back-propagate below the lowest adapted layer (same results, less work)."},
    )
    use_dora: bool = field(
        default=False,
        metadata={"help": "DoRA (PEFT use_dora): each adapted weight also trains a magnitude vector "
                  "(weight-decomposed LoRA). Not for MoE expert tensors."},
    )  # fmt: skip
    use_rslora: bool = field(
        default=False,
        metadata={"help": "rsLoRA (PEFT use_rslora): scale each update by alpha / sqrt(rank) instead of alpha / rank."},
    )  # fmt: skip
    init_lora_weights: str = field(
        default="true",
        metadata={"help": "PEFT init_lora_weights: 'true' (B = 0, the adapter starts as a no-op), 'gaussian', "
                  "'orthogonal' (even ranks only) or 'false' (random A and B, for debugging). Initializations that "
                  "need data or rewrite the base weights (pissa, olora, loftq, eva, corda) are refused."},
    )  # fmt: skip

    def _check(self) -> None:
        at_least(self, 1, "r")
        at_least(self, 1, "attention_r", "mlp_r", unset_ok=True)
        if not self.mlp_rank_factor > 0:
            raise ValueError(f"mlp_rank_factor={self.mlp_rank_factor}; it must be > 0 (1 = uniform ranks).")
        init = self.init_lora_weights
        if init not in INIT_LORA_WEIGHTS:
            why = _REFUSED_INITS.get(str(init).split("_niter_")[0], "it is not one of PEFT's initializations")
            raise ValueError(f"init_lora_weights={init!r}: {why}; use one of {list(INIT_LORA_WEIGHTS)}.")
        ranks = {"r": self.r, "attention_r": self.attention_r or self.r, "mlp_r": self.effective_mlp_r}
        odd = {k: v for k, v in ranks.items() if v % 2} if init == "orthogonal" else {}
        if odd:
            raise ValueError(
                f"init_lora_weights='orthogonal' needs even ranks; these are odd: {odd}. Set even r / attention_r / "
                f"mlp_r, or use --init_lora_weights gaussian."
            )

    @property
    def effective_mlp_r(self) -> int:
        """The rank MLP and expert weights get: ``mlp_r``, else ``round(mlp_rank_factor * r)``."""
        return self.mlp_r if self.mlp_r is not None else max(1, round(self.mlp_rank_factor * self.r))

    def lora_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`aletheia_lora.lora_config.apply_aletheia_lora` these settings mean."""
        return dict(
            r=self.r,
            lora_alpha=self.lora_alpha,
            attention_r=self.attention_r,
            mlp_r=self.effective_mlp_r,
            attention_alpha=self.attention_alpha,
            mlp_alpha=self.mlp_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=self.target_modules,
            layers_path=self.layers_path,
            use_dora=self.use_dora,
            use_rslora=self.use_rslora,
            init_lora_weights=INIT_LORA_WEIGHTS[self.init_lora_weights],
        )


@dataclass(kw_only=True)
class OutputSettings(Settings):
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow writing into a non-empty output directory."}
    )
    quiet: bool = field(
        default=False, metadata={"help": "No progress lines (a command's table is still printed)."}
    )


@dataclass(kw_only=True)
class OutputDirSettings(OutputSettings):
    """``OutputSettings`` plus the folder (``train`` takes its folder from TrainingArguments)."""

    output_dir: str | None = field(
        default=None,
        metadata={"help": "Where the command writes its files (default: runs/<command>-<date>-<time>)."},
    )


@dataclass(kw_only=True)
class ExportSettings(Settings):
    """``probe --export FORMAT``: the selection as a config for another trainer."""

    export: str | None = field(
        default=None,
        metadata={"help": "Also write the selection as a config for your own trainer: 'peft' (adapter_config.json), "
                  "'axolotl' (axolotl.yaml) or 'llama-factory' (llama_factory.yaml), into the output folder.",
                  "choices": list(EXPORT_FILES)},
    )  # fmt: skip

    def _check(self) -> None:
        if self.export is not None:
            check_format(self.export)


# --------------------------------------------------------------------------- composed settings


@dataclass(kw_only=True)
class AletheiaConfig(BudgetSettings, ProbeSettings, LoraSettings):
    """Probe, selection and LoRA settings of :func:`prepare_model`. Every field is a CLI flag of the same name."""

    strategy: str = field(
        default="top",
        metadata={"help": "How layers are chosen: 'top' (highest scores), 'depth-aware' (most score per "
                  "predicted training cost), 'random' or 'last' (baselines).", "choices": list(STRATEGIES)},
    )  # fmt: skip
    calibrate_cost: bool = field(
        default=False,
        metadata={"help": "Before selecting, train three reference selections for a few steps on this machine "
                  "and fit the cost model to them (as `bench --calibrate`), so depth-aware, target_speedup and "
                  "the predicted speedup use this machine's costs instead of the H200's. About 10 short steps."},
    )  # fmt: skip
    calibrate_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Sequences per calibration step (default: the training batch size in `train`, else 4)."
        },
    )
    calibrate_seq_len: int | None = field(
        default=None,
        metadata={"help": "Tokens per calibration sequence (default: --max_length in `train`, else 256)."},
    )
    seed: int = field(default=42, metadata={"help": "Seed of the probe's example order."})

    @property
    def probe_ranks(self) -> dict[str, int]:
        """The LoRA ranks ``score='lora-energy'`` keeps: attention's, and MLP's (experts and routers too)."""
        return {"attention": self.attention_r or self.r, "mlp": self.effective_mlp_r}

    def _check(self) -> None:
        at_least(self, 1, "calibrate_batch_size", "calibrate_seq_len", unset_ok=True)
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r}; use one of {list(STRATEGIES)}.")
        if self.target_speedup is not None and self.strategy != "depth-aware":
            raise ValueError(
                f"target_speedup={self.target_speedup}; it needs strategy='depth-aware' (--strategy depth-aware)."
            )


@dataclass(kw_only=True)
class DataSettings(Settings):
    data: str | None = field(
        default=None,
        metadata={"help": "A .jsonl/.json/.csv/.parquet file, a datasets.save_to_disk folder, a hub dataset, or "
                  "empty for the embedded arithmetic task."},
    )  # fmt: skip
    format: str | None = field(
        default=None,
        metadata={
            "help": "Row format: text, prompt_completion, question_answer, messages, alpaca (default: detect)."
        },
    )
    max_length: int = field(default=256, metadata={"help": "Truncate examples to this many tokens."})
    completion_only_loss: bool = field(
        default=True, metadata={"help": "Loss on completions only for the paired formats."}
    )
    eval_fraction: float = field(
        default=0.05, metadata={"help": "Held-out fraction when the data has no test split."}
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use at most this many training rows."}
    )
    max_eval_samples: int | None = field(
        default=200, metadata={"help": "Evaluate on at most this many rows."}
    )
    eval_generate: int = field(
        default=50,
        metadata={
            "help": "Held-out questions to answer by greedy decoding for exact match (question/answer data)."
        },
    )

    def _check(self) -> None:
        at_least(self, 1, "max_length")
        at_least(self, 1, "max_train_samples", "max_eval_samples", unset_ok=True)
        at_least(self, 0, "eval_generate")
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"eval_fraction={self.eval_fraction}; it must be in (0, 1), e.g. 0.05.")


@dataclass(kw_only=True)
class ScheduleTuning(Settings):
    """How the over-the-run schedules (``schedules.py``) decide: shared by ``train`` and ``race``."""

    freeze_interval: int = field(
        default=8, metadata={"help": "freeze: optimizer steps per statistic interval."}
    )
    freeze_threshold: float = field(
        default=0.25,
        metadata={"help": "freeze: a block counts as converged when its adapter-gradient statistic changes by less "
                  "than this share between two intervals."},
    )  # fmt: skip
    freeze_min_steps: int = field(default=24, metadata={"help": "freeze: no block freezes before this step."})
    freeze_max_frozen: float = field(
        default=0.5, metadata={"help": "freeze: the largest share of the adapted blocks that may freeze."}
    )
    max_drop_rate: float = field(
        default=0.8, metadata={"help": "drop: no block's backward is skipped with a higher probability."}
    )

    def _check(self) -> None:
        at_least(self, 1, "freeze_interval")
        at_least(self, 0, "freeze_min_steps")
        if not self.freeze_threshold > 0:
            raise ValueError(f"freeze_threshold={self.freeze_threshold}; it must be > 0 (e.g. 0.25).")
        if not 0 < self.freeze_max_frozen < 1:
            raise ValueError(
                f"freeze_max_frozen={self.freeze_max_frozen}; it must be a share in (0, 1), e.g. 0.5."
            )
        if not 0 <= self.max_drop_rate <= 1:
            raise ValueError(f"max_drop_rate={self.max_drop_rate}; it must be a probability in [0, 1].")


SCHEDULE_CHOICES = ("static", "freeze", "drop")


@dataclass(kw_only=True)
class ScheduleSettings(ScheduleTuning):
    """``train --schedule``: what changes over the run (docs/method.md, "Over the run")."""

    schedule: str = field(
        default="static",
        metadata={"help": "static: the selected layers train throughout (the published method); freeze: a "
                  "converged bottom prefix of them stops training and the backward gets shorter; drop: each "
                  "step skips some blocks' backward, low-scoring blocks more often (see `aletheia-lora race` "
                  "for what each bought on our runs).", "choices": list(SCHEDULE_CHOICES)},
    )  # fmt: skip
    drop_target_speedup: float = field(
        default=1.3, metadata={"help": "drop: the predicted step speedup the drop rates aim at (> 1)."}
    )

    def _check(self) -> None:
        if self.schedule not in SCHEDULE_CHOICES:
            raise ValueError(f"schedule={self.schedule!r}; use one of {list(SCHEDULE_CHOICES)}.")
        if not self.drop_target_speedup > 1:
            raise ValueError(f"drop_target_speedup={self.drop_target_speedup}; it must be > 1, e.g. 1.3.")


@dataclass(kw_only=True)
class RunSettings(OutputSettings, ScheduleSettings):
    """``train``'s own switches (its output folder is TrainingArguments' ``output_dir``)."""

    merge: bool = field(default=False, metadata={"help": "Also save the merged model to OUTPUT_DIR/merged."})
    skip_nonfinite_steps: bool = field(
        default=False,
        metadata={
            "help": "Skip optimizer steps with a NaN/inf gradient instead of stopping (default: stop)."
        },
    )


__all__ = [
    "DTYPES",
    "INIT_LORA_WEIGHTS",
    "QUANT_TYPES",
    "AletheiaConfig",
    "BudgetSettings",
    "DataSettings",
    "ExportSettings",
    "LoraSettings",
    "ModelSettings",
    "OutputDirSettings",
    "OutputSettings",
    "ProbeSettings",
    "RunSettings",
    "SCHEDULE_CHOICES",
    "SCORES",
    "ScheduleSettings",
    "ScheduleTuning",
    "Settings",
    "at_least",
]
