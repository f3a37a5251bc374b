"""The one selection path: probe -> scores -> selected layers -> LoRA, as plain data.

    peft_model, plan = prepare_model(model, train_rows, AletheiaConfig(top_pct=50, mlp_r=64))
    Trainer(model=peft_model, args=..., train_dataset=..., data_collator=...).train()

``prepare_model`` is ``run_probe`` + ``select`` + ``wrap_with_plan``; ``train``, ``bench`` and
``study`` call those same three functions, so a selection means the same thing everywhere.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from .architecture import Architecture, find_blocks
from .contribution import NAME as CONTRIBUTION
from .contribution import lora_warmup, warm_start
from .costmodel import CostModel, cost_model
from .export import export_plan
from .lora_config import apply_aletheia_lora, lora_param_count, refuse_peft_model
from .models import base_model_reference
from .probe import SIGNALS, gradient_probe
from .scores import LayerScores
from .selection import select_layers
from .settings import AletheiaConfig
from .timing import calibrated_cost_model
from .truncation import truncate_backward


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
    blocks_path: str | None = None  # where the decoder blocks live ("model.layers"); names modules in exports
    base_model: str | None = None  # what the adapter names as its base: a hub id, or a local path
    warm_started: int = 0  # adapter tensors that start from the contribution warm-up's weights

    def export(self, fmt: str) -> str:
        """This selection as a config snippet for another trainer: ``fmt`` is one of
        ``peft`` (adapter_config.json), ``axolotl`` or ``llama-factory`` (YAML); see :mod:`.export`."""
        return export_plan(self, fmt)

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
            "blocks_path": self.blocks_path,
            "base_model": self.base_model,
            "warm_started": self.warm_started,
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
            blocks_path=data.get("blocks_path"),
            base_model=data.get("base_model"),
            warm_started=data.get("warm_started", 0),
        )

    @classmethod
    def from_json(cls, text: str) -> AletheiaPlan:
        return cls.from_dict(json.loads(text))


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
    batch_size, seq_len = config.calibrate_batch_size or 4, config.calibrate_seq_len or 256
    cost = planned_cost(model, config, batch_size=batch_size, seq_len=seq_len)
    return calibrated_cost_model(
        model,
        cost,
        batch_size=batch_size,
        seq_len=seq_len,
        lora_kwargs=config.lora_kwargs(),
        seed=config.seed,
    )


def run_probe(
    model: nn.Module,
    dataset: Any,
    config: AletheiaConfig,
    *,
    tokenizer: Any = None,
    progress: bool = False,
    device: torch.device | str | None = None,
    signals: str | list[str] | None = None,
) -> tuple[LayerScores, float]:
    """The gradient probe ``config`` describes; returns ``(scores, seconds)``.

    The scores are ``config.score``'s signal (``lora-energy`` at the ranks ``config`` trains), so
    :func:`select` ranks layers by it; ``signals`` (e.g. ``"all"``) computes others in the same pass.
    ``contribution`` (the score, or named in ``signals``, or ``"all"``) adds the all-layer LoRA warm-up
    of :mod:`contribution` at ``config``'s ranks on the same batches, its time in ``seconds``; when it
    is the score, its adapter weights ride along in ``scores.warmup_state`` for :func:`wrap_with_plan`."""
    start = time.perf_counter()
    named = [signals] if isinstance(signals, str) and signals != "all" else list(signals or [])
    warmup = config.score == CONTRIBUTION or signals == "all" or CONTRIBUTION in named
    probed = "all" if signals == "all" else [n for n in named if n in SIGNALS]
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
        device=device,
        score="grad-norm" if config.score == CONTRIBUTION else config.score,
        ranks=config.probe_ranks,
        signals=probed,
    )
    if warmup:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_world_size() > 1:
                raise ValueError(
                    "score='contribution' (or signals='all') trains an all-layer LoRA warm-up in one process; "
                    "under data parallel probe with another --score, or run the warm-up on a single process."
                )
        arch = find_blocks(model, config.layers_path)
        every_layer = apply_aletheia_lora(model, list(range(arch.num_layers)), **config.lora_kwargs())
        warm = lora_warmup(
            model,
            dataset,
            every_layer,
            steps=config.probe_batches,
            batch_size=config.probe_batch_size,
            max_length=config.probe_max_length,
            lr=config.warmup_lr,
            seed=config.seed,
            tokenizer=tokenizer,
            layers_path=config.layers_path,
        )
        signals_now = scores.signals | {CONTRIBUTION: warm.contribution}
        meta = scores.meta | {"warmup_steps": len(warm.losses), "warmup_lr": config.warmup_lr,
                              "warmup_seconds": warm.seconds, "warmup_losses": warm.losses}  # fmt: skip
        scores = LayerScores(
            scores, modules=scores.modules, roles=scores.roles, meta=meta, signals=signals_now
        ).with_score(config.score)
        if config.score == CONTRIBUTION:  # the selection follows the warm-up, so training continues it
            scores.warmup_state = warm.adapter_state
    return scores, time.perf_counter() - start


def select(
    scores: LayerScores,
    config: AletheiaConfig,
    *,
    model: nn.Module | None = None,
    cost: CostModel | None = None,
    seed: int | None = None,
    gradient_checkpointing: bool = False,
) -> list[int]:
    """The layers ``config``'s strategy and budget pick from ``scores``.

    ``cost``: the cost model depth-aware weighs layers by (default :func:`planned_cost` of
    ``model``); ``seed``: the random strategy's seed (default ``config.seed``).
    """
    if cost is None and config.strategy == "depth-aware":
        if model is None:
            raise ValueError("strategy='depth-aware' needs the model (or a cost model) to weigh layer costs.")
        cost = planned_cost(model, config)
    return select_layers(
        scores,
        config.top_pct,
        top_k=config.top_k,
        strategy=config.strategy,
        seed=config.seed if seed is None else seed,
        cost=cost,
        model=model,
        target_speedup=config.target_speedup,
        gradient_checkpointing=gradient_checkpointing,
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
    """:func:`run_probe` then :func:`select`: ``(scores, selected_layers, probe_seconds)``."""
    scores, probe_seconds = run_probe(model, dataset, config, tokenizer=tokenizer, progress=progress)
    return scores, select(scores, config, model=model, cost=cost), probe_seconds


def plan_for(
    model: nn.Module,
    scores: LayerScores,
    selected: list[int],
    config: AletheiaConfig,
    *,
    probe_seconds: float = 0.0,
    arch: Architecture | None = None,
    cost: CostModel | None = None,
) -> AletheiaPlan:
    """The plan of LoRA on ``selected`` layers of ``model``, without wrapping it (the model is not modified).
    ``cost`` predicts the speedup (default :func:`planned_cost`; a calibrated one is recorded)."""
    arch = arch or find_blocks(model, config.layers_path)
    lora_kwargs = config.lora_kwargs()
    lora_config = apply_aletheia_lora(model, selected, **lora_kwargs)
    everything = apply_aletheia_lora(model, list(range(arch.num_layers)), **lora_kwargs)
    name_or_path = getattr(model, "name_or_path", None)
    return AletheiaPlan(
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
        blocks_path=arch.blocks_path,
        base_model=base_model_reference(name_or_path)["name"] if name_or_path else None,
    )


def wrap_with_plan(
    model: nn.Module, scores: LayerScores, selected: list[int], config: AletheiaConfig, **options: Any
) -> tuple[nn.Module, AletheiaPlan]:
    """LoRA on ``selected`` layers of ``model`` (no probe); used by prepare_model and resume.
    ``options`` are :func:`plan_for`'s (``probe_seconds``, ``arch``, ``cost``)."""
    plan = plan_for(model, scores, selected, config, **options)
    with torch.random.fork_rng(devices=[]):  # LoRA A matrices are random: make them a function of the seed
        torch.manual_seed(config.seed)
        peft_model = get_peft_model(model, plan.lora_config)
    if plan.base_model:
        peft_model.peft_config["default"].base_model_name_or_path = plan.base_model
    if (
        scores.warmup_state
    ):  # the contribution warm-up trained these adapters: the kept layers go on from there
        plan.warm_started = warm_start(peft_model, scores.warmup_state)
    if config.truncate_backward:
        truncate_backward(peft_model, layers_path=config.layers_path)
    return peft_model, plan


__all__ = [
    "AletheiaConfig",
    "AletheiaPlan",
    "machine_cost",
    "plan_for",
    "planned_cost",
    "prepare_model",
    "probe_and_select",
    "run_probe",
    "select",
    "wrap_with_plan",
]
