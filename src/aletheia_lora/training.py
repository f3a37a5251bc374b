"""probe -> select -> LoRA in one call, and what a Trainer needs around it.

peft_model, plan = prepare_model(model, train_rows, AletheiaConfig(top_pct=50, mlp_r=64))
Trainer(model=peft_model, args=..., train_dataset=..., data_collator=...).train()
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import TrainerCallback

from .architecture import Architecture, find_blocks
from .config import apply_aletheia_lora, refuse_peft_model
from .costmodel import CostModel, cost_model
from .probe import METHODS, PARAMS, gradient_probe
from .scores import LayerScores
from .selection import STRATEGIES, select_layers


@dataclass
class AletheiaConfig:
    """Probe, selection and LoRA settings. Every field works as a CLI flag of the same name."""

    top_pct: float = field(default=50, metadata={"help": "Percentage of layers to adapt, in (0, 100]."})
    top_k: int | None = field(
        default=None, metadata={"help": "Adapt exactly this many layers (overrides top_pct)."}
    )
    strategy: str = field(
        default="top",
        metadata={
            "help": "How layers are chosen: 'top' (highest scores), 'depth-aware' (most score per "
            "predicted training cost), 'random' or 'last' (baselines).",
            "choices": list(STRATEGIES),
        },
    )
    target_speedup: float | None = field(
        default=None,
        metadata={
            "help": "depth-aware only: the least predicted speedup over all-layer LoRA (e.g. 1.5); "
            "top_pct/top_k then cap the number of layers."
        },
    )
    probe_batches: int = field(default=5, metadata={"help": "Forward+backward passes of the gradient probe."})
    probe_batch_size: int = field(default=1, metadata={"help": "Examples per probe batch."})
    probe_max_length: int | None = field(
        default=None,
        metadata={"help": "Truncate probe examples to this many tokens (default: as tokenized)."},
    )
    probe_params: str = field(
        default="lora-targets",
        metadata={
            "help": "What the probe scores: 'lora-targets' (the weights LoRA adapts) or 'all' (every "
            "parameter of the block, norms included: the published definition).",
            "choices": list(PARAMS),
        },
    )
    probe_method: str = field(
        default="onepass",
        metadata={
            "help": "'onepass' (hooks, no weight gradients) or 'chunked' (reference).",
            "choices": list(METHODS),
        },
    )
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
        metadata={
            "help": "Without mlp_r, MLP and expert weights get rank mlp_rank_factor x r (default 4: attention "
            "r=16, MLP r=64, the best arm of the quality study; 1 for uniform ranks)."
        },
    )
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
    calibrate_cost: bool = field(
        default=False,
        metadata={
            "help": "Before selecting, train three reference selections for a few steps on this machine "
            "and fit the cost model to them (as `bench --calibrate`), so depth-aware, target_speedup and "
            "the predicted speedup use this machine's costs instead of the H200's. About 10 short steps."
        },
    )
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

    def __post_init__(self) -> None:
        if not 0 < self.top_pct <= 100:
            raise ValueError(f"top_pct={self.top_pct}; it must be a percentage in (0, 100], e.g. 50.")
        for name in ("probe_batches", "probe_batch_size", "r"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}; it must be >= 1.")
        if not self.mlp_rank_factor > 0:
            raise ValueError(f"mlp_rank_factor={self.mlp_rank_factor}; it must be > 0 (1 = uniform ranks).")
        for name in ("attention_r", "mlp_r", "top_k", "calibrate_batch_size", "calibrate_seq_len"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value}; it must be >= 1 (or unset).")
        if self.probe_params not in PARAMS:
            raise ValueError(f"probe_params={self.probe_params!r}; use one of {list(PARAMS)}.")
        if self.probe_method not in METHODS:
            raise ValueError(f"probe_method={self.probe_method!r}; use one of {list(METHODS)}.")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r}; use one of {list(STRATEGIES)}.")
        if self.target_speedup is not None and (self.strategy != "depth-aware" or self.target_speedup < 1):
            raise ValueError(
                f"target_speedup={self.target_speedup}; it needs strategy='depth-aware' and a value >= 1."
            )

    @property
    def effective_mlp_r(self) -> int:
        """The rank MLP and expert weights get: ``mlp_r``, else ``round(mlp_rank_factor * r)``."""
        return self.mlp_r if self.mlp_r is not None else max(1, round(self.mlp_rank_factor * self.r))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class AletheiaPlan:
    """What prepare_model decided, and what it costs. Plain data; JSON round-trips."""

    scores: LayerScores
    selected_layers: list[int]
    lora_config: LoraConfig
    config: AletheiaConfig
    num_layers: int
    probe_seconds: float
    trainable_params: int
    all_layer_trainable_params: int
    predicted_speedup: float | None = None  # step time of all-layer LoRA / this plan's (cost model)
    calibration: dict[str, Any] | None = None  # the cost model's fit on this machine (calibrate_cost)

    @property
    def trainable_fraction(self) -> float:
        """Trainable parameters relative to LoRA on every layer with the same ranks."""
        return self.trainable_params / max(1, self.all_layer_trainable_params)

    def to_dict(self) -> dict[str, Any]:
        lora = self.lora_config.to_dict()
        lora = {k: sorted(v) if isinstance(v, set) else v for k, v in lora.items()}
        return {
            "selected_layers": self.selected_layers,
            "num_layers": self.num_layers,
            "probe_seconds": self.probe_seconds,
            "trainable_params": self.trainable_params,
            "all_layer_trainable_params": self.all_layer_trainable_params,
            "predicted_speedup": self.predicted_speedup,
            "calibration": self.calibration,
            "config": self.config.to_dict(),
            "lora_config": json.loads(json.dumps(lora, default=str)),
            "scores": self.scores.to_dict(),
        }

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AletheiaPlan:
        lora = dict(data["lora_config"])
        known = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
        lora = {k: v for k, v in lora.items() if k in known and k not in ("peft_type",)}
        return cls(
            scores=LayerScores.from_dict(data["scores"]),
            selected_layers=list(data["selected_layers"]),
            lora_config=LoraConfig(**lora),
            # plans written before mlp_rank_factor existed had uniform ranks
            config=AletheiaConfig(**{"mlp_rank_factor": 1} | data["config"]),
            num_layers=data["num_layers"],
            probe_seconds=data["probe_seconds"],
            trainable_params=data["trainable_params"],
            all_layer_trainable_params=data["all_layer_trainable_params"],
            predicted_speedup=data.get("predicted_speedup"),
            calibration=data.get("calibration"),
        )

    @classmethod
    def from_json(cls, text: str) -> AletheiaPlan:
        return cls.from_dict(json.loads(text))


def lora_param_count(model: nn.Module, lora_config: LoraConfig, arch: Architecture | None = None) -> int:
    """Parameters LoRA adds under ``lora_config``, from the weight shapes (no model change).

    A Linear (out, in) at rank r adds r * (in + out); a 3-D expert tensor (E, out, in) adds
    r * E * (in + out), as PEFT's ParamWrapper does.
    """
    from peft.utils.other import get_pattern_key

    arch = arch or find_blocks(model)
    prefix = arch.blocks_path
    total = 0
    layers = lora_config.layers_to_transform or []
    for name in sorted(lora_config.target_modules or []):
        for i in layers:
            full = f"{prefix}.{i}.{name}"
            module = arch.blocks[i].get_submodule(name)
            weight = module.weight
            rank = lora_config.rank_pattern.get(
                get_pattern_key(lora_config.rank_pattern.keys(), full), lora_config.r
            )
            total += rank * (weight.shape[0] + weight.shape[1])
    for path in lora_config.target_parameters or []:
        module_path, _, pname = path.rpartition(".")
        param = getattr(model.get_submodule(module_path), pname)
        rank = lora_config.rank_pattern.get(
            get_pattern_key(lora_config.rank_pattern.keys(), path), lora_config.r
        )
        experts = param.shape[0] if param.dim() == 3 else 1
        total += rank * experts * (param.shape[-1] + param.shape[-2])
    return total


def prepare_model(
    model: nn.Module,
    dataset: Any,
    config: AletheiaConfig | None = None,
    *,
    tokenizer: Any = None,
    progress: bool = False,
    **overrides: Any,
) -> tuple[nn.Module, AletheiaPlan]:
    """Probe ``model`` on ``dataset``, select layers, and wrap the model with LoRA on them.

    ``overrides`` replace fields of ``config`` (``prepare_model(m, d, top_pct=25)``).
    Returns ``(peft_model, plan)``; the plan holds the scores, the selection, the
    LoraConfig, the probe time, and trainable parameters next to all-layer LoRA's.
    """
    config = config or AletheiaConfig()
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(AletheiaConfig)})
    if unknown:
        raise TypeError(f"unknown AletheiaConfig fields {unknown}; see AletheiaConfig for the settings.")
    config = dataclasses.replace(config, **overrides)
    refuse_peft_model(model)
    cost = machine_cost(model, config) if config.calibrate_cost else None
    scores, selected, probe_seconds = probe_and_select(
        model, dataset, config, tokenizer=tokenizer, progress=progress, cost=cost
    )
    return wrap_with_plan(model, scores, selected, config, probe_seconds=probe_seconds, cost=cost)


def planned_cost(
    model: nn.Module, config: AletheiaConfig, *, batch_size: int = 4, seq_len: int = 1024
) -> CostModel:
    """The step-cost model at the ranks and targets ``config`` will train (FLOPs, H200 factors)."""
    return cost_model(
        model,
        batch_size=batch_size,
        seq_len=seq_len,
        r=config.r,
        attention_r=config.attention_r,
        mlp_r=config.effective_mlp_r,
        target_modules=config.target_modules,
        layers_path=config.layers_path,
    )


def machine_cost(model: nn.Module, config: AletheiaConfig) -> CostModel:
    """:func:`planned_cost` fitted to step times measured on this machine (``calibrate_cost``):
    every_other, bottom_quarter and top_quarter trained a few steps each at ``config``'s ranks,
    ``calibrate_batch_size`` x ``calibrate_seq_len`` random tokens (default 4 x 256)."""
    from .bench import calibrated_cost_model

    batch_size, seq_len = config.calibrate_batch_size or 4, config.calibrate_seq_len or 256
    cost = planned_cost(model, config, batch_size=batch_size, seq_len=seq_len)
    return calibrated_cost_model(
        model,
        cost,
        batch_size=batch_size,
        seq_len=seq_len,
        lora_kwargs=_lora_kwargs(config),
        seed=config.seed,
    )


def _lora_kwargs(config: AletheiaConfig) -> dict[str, Any]:
    return dict(
        r=config.r,
        lora_alpha=config.lora_alpha,
        attention_r=config.attention_r,
        mlp_r=config.effective_mlp_r,
        attention_alpha=config.attention_alpha,
        mlp_alpha=config.mlp_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.target_modules,
        layers_path=config.layers_path,
    )


def probe_and_select(
    model: nn.Module,
    dataset: Any,
    config: AletheiaConfig,
    *,
    tokenizer: Any = None,
    progress: bool = False,
    cost: CostModel | None = None,
) -> tuple[LayerScores, list[int], float]:
    """The probe and the selection ``config`` asks for: ``(scores, selected_layers, probe_seconds)``.
    ``cost``: the cost model depth-aware uses (default :func:`planned_cost`)."""
    start = time.perf_counter()
    scores = gradient_probe(
        model,
        dataset,
        probe_batches=config.probe_batches,
        batch_size=config.probe_batch_size,
        max_length=config.probe_max_length,
        params=config.probe_params,
        method=config.probe_method,
        seed=config.seed,
        tokenizer=tokenizer,
        layers_path=config.layers_path,
        progress=progress,
    )
    probe_seconds = time.perf_counter() - start
    if cost is None and config.strategy == "depth-aware":
        cost = planned_cost(model, config)
    selected = select_layers(
        scores,
        config.top_pct,
        top_k=config.top_k,
        strategy=config.strategy,
        seed=config.seed,
        cost=cost,
        target_speedup=config.target_speedup,
    )
    return scores, selected, probe_seconds


def wrap_with_plan(
    model: nn.Module,
    scores: LayerScores,
    selected: list[int],
    config: AletheiaConfig,
    *,
    probe_seconds: float = 0.0,
    arch: Architecture | None = None,
    cost: CostModel | None = None,
) -> tuple[nn.Module, AletheiaPlan]:
    """LoRA on ``selected`` layers of ``model`` (no probe); used by prepare_model and resume.
    ``cost`` predicts the speedup (default :func:`planned_cost`; a calibrated one is recorded)."""
    arch = arch or find_blocks(model, config.layers_path)
    lora_kwargs = _lora_kwargs(config)
    lora_config = apply_aletheia_lora(model, selected, **lora_kwargs)
    everything = apply_aletheia_lora(model, list(range(arch.num_layers)), **lora_kwargs)
    plan = AletheiaPlan(
        scores=scores,
        selected_layers=list(selected),
        lora_config=lora_config,
        config=config,
        num_layers=arch.num_layers,
        probe_seconds=probe_seconds,
        trainable_params=lora_param_count(model, lora_config, arch),
        all_layer_trainable_params=lora_param_count(model, everything, arch),
        predicted_speedup=(cost or planned_cost(model, config)).speedup(selected),
        calibration=cost.meta.get("calibration") if cost is not None else None,
    )
    with torch.random.fork_rng(devices=[]):  # LoRA A matrices are random: make them a function of the seed
        torch.manual_seed(config.seed)
        peft_model = get_peft_model(model, lora_config)
    if config.truncate_backward:
        truncate_backward(peft_model, layers_path=config.layers_path)
    return peft_model, plan


# --------------------------------------------------------------------------- truncated backward


def _enter_no_grad(module, args):
    module._aletheia_grad_mode = torch.is_grad_enabled()
    torch.set_grad_enabled(False)


def _exit_no_grad(module, args, output):
    torch.set_grad_enabled(module.__dict__.pop("_aletheia_grad_mode", True))


def truncate_backward(model: nn.Module, *, layers_path: str | None = None) -> int | None:
    """Stop the backward pass at the lowest block with trainable parameters; return its index.

    * blocks below it run under ``no_grad`` (forward hooks, idempotent), so no autograd graph
      and no saved activations exist there even if the inputs were made to require grad;
    * input-embedding ``requires_grad`` hooks (``enable_input_require_grads``) are removed;
    * where gradient checkpointing is on, blocks below are not checkpointed and blocks at or
      above it use non-reentrant checkpointing (reentrant needs inputs that require grad).

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
    lowest = trainable[0]
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
