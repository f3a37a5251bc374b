"""A plan's layer selection as a config snippet for the trainer a user already has.

    text = export_plan(plan, "axolotl")     # or plan.export("axolotl")

``peft``          ``adapter_config.json`` for ``LoraConfig.from_pretrained`` (transformers + PEFT, TRL):
                  the plan's own LoraConfig, so always exact.
``axolotl``       the LoRA keys of an axolotl YAML config, to merge into the user's.
``llama-factory`` the LoRA arguments of a LLaMA-Factory YAML config.

Where a framework cannot express the selection exactly, the snippet says so in a ``NOT EXACT``
comment and writes the closest faithful form; it never approximates silently.

Keys were taken from each project's source (checked 2026-12):

* PEFT 0.21: ``LoraConfig`` fields ``target_modules`` (a list entry matches a module whose name
  is the entry or ends in ``.entry``), ``layers_to_transform`` + ``layers_pattern`` (a regex matched as
  ``<pattern>.<index>.`` anywhere in a module's path: on a multimodal wrapper the plan writes the escaped
  block path, ``re.escape("model.language_model.layers")``, so a vision tower's ``encoder.layers`` is not matched),
  ``rank_pattern`` / ``alpha_pattern`` (regex keys), ``target_parameters``, ``use_dora``, ``use_rslora``,
  ``init_lora_weights``.
* axolotl, ``src/axolotl/loaders/adapter.py`` at commit 01883e35e2f4 (``_build_peft_lora_config``
  and ``_build_lora_config_kwargs``): ``lora_r``, ``lora_alpha``, ``lora_dropout``,
  ``lora_target_modules``, ``lora_target_parameters``, ``peft_layers_to_transform``,
  ``peft_layers_pattern``, ``lora_fan_in_fan_out``, ``lora_rank_pattern`` / ``lora_alpha_pattern``
  (passed to PEFT as ``rank_pattern`` / ``alpha_pattern``; added by axolotl PR #3673, merged 2026-07-08,
  released from v0.18.0: the loader at b78dab1e40f8 has no such keys, and an older axolotl drops them
  silently), ``peft_use_dora``, ``peft_use_rslora``, ``peft_init_lora_weights`` (passed as ``use_dora``,
  ``use_rslora``, ``init_lora_weights``, each only when truthy, so ``init_lora_weights: false`` cannot be
  said); ``lora_target_linear: true`` would add every linear module. Schema:
  ``src/axolotl/utils/schemas/peft.py`` at f5ff7a9cf14e (``lora_r`` and ``lora_alpha`` are integers,
  ``peft_layers_pattern`` a list, ``peft_init_lora_weights`` a bool or a string).
* LLaMA-Factory, ``src/llamafactory/hparams/finetuning_args.py`` at 00577a85775a (``LoraArguments``:
  ``lora_rank``, ``lora_alpha``, ``lora_dropout``, ``lora_target`` split on commas) and
  ``src/llamafactory/model/adapter.py`` at 01d87b8267b9 (the names go to PEFT's ``target_modules``
  unchanged for text-only models; for a multimodal model ``patch_target_modules`` keeps every module whose
  name contains an entry, so full names stay exact), ``use_dora`` / ``use_rslora`` passed to PEFT, and
  ``pissa_init`` the only other initialization. There is no layer index, rank pattern or parameter target,
  so the layers are written as full module names and per-module ranks cannot be kept.
"""

from __future__ import annotations

import json
import textwrap
from typing import TYPE_CHECKING, Any, Protocol

import yaml

if TYPE_CHECKING:
    from peft import LoraConfig


class PlanLike(Protocol):
    """What an export reads of a :class:`aletheia_lora.plan.AletheiaPlan` (which imports this module)."""

    lora_config: LoraConfig
    selected_layers: list[int]
    num_layers: int
    config: Any  # AletheiaConfig: strategy, score, top_pct, top_k
    predicted_speedup: float | None
    calibration: dict[str, Any] | None
    blocks_path: str | None
    base_model: str | None


# format -> the file `aletheia-lora probe --export FORMAT` writes into its output folder
EXPORT_FILES = {
    "peft": "adapter_config.json",
    "axolotl": "axolotl.yaml",
    "llama-factory": "llama_factory.yaml",
}
EXPORT_FORMATS = tuple(EXPORT_FILES)


def check_format(fmt: str) -> str:
    """``fmt`` if it is an export format; ``ValueError`` naming the formats otherwise."""
    if fmt not in EXPORT_FILES:
        raise ValueError(f"export format {fmt!r} is unknown; use one of {list(EXPORT_FORMATS)}.")
    return fmt


def export_plan(plan: PlanLike, fmt: str) -> str:
    """The text of ``plan``'s selection in ``fmt`` (``peft``, ``axolotl`` or ``llama-factory``)."""
    return {"peft": _peft, "axolotl": _axolotl, "llama-factory": _llama_factory}[check_format(fmt)](plan)


def _number(value: Any) -> Any:
    """``32.0`` -> ``32`` (YAML readers that want an integer get one); other values unchanged."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _lora(plan: PlanLike) -> dict[str, Any]:
    """The plan's LoraConfig as JSON-ready data (sets as sorted lists)."""
    data = plan.lora_config.to_dict()
    data = {k: sorted(v) if isinstance(v, set) else v for k, v in data.items()}
    return json.loads(json.dumps(data, default=str))


def _peft(plan: PlanLike) -> str:
    data = _lora(plan)
    data["base_model_name_or_path"] = plan.base_model or data.get("base_model_name_or_path")
    data["inference_mode"] = False  # a config to train with
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def _header(plan: PlanLike, trainer: str, source: str) -> list[str]:
    config = plan.config
    budget = f"top_k {config.top_k}" if config.top_k else f"top_pct {config.top_pct:g}"
    fitted = "calibrated on the probing machine" if plan.calibration else "fitted on an H200"
    speed = (
        f"; predicted step speedup over all-layer LoRA {plan.predicted_speedup:.2f}x, cost model {fitted}"
        if plan.predicted_speedup
        else ""
    )
    lines = [
        f"LoRA for {trainer} on the layers aletheia-lora selected: {plan.selected_layers} of {plan.num_layers}",
        f"(strategy {config.strategy}, score {config.score}, {budget}{speed}).",
        f"Keys as {source}.",
    ]
    if plan.base_model:
        lines.append(f"Probed on {plan.base_model}: use the same base model.")
    return lines


def _yaml(comments: list[str], notes: list[str], data: dict[str, Any]) -> str:
    """YAML of ``data`` under ``#`` comment lines; each note a ``# NOT EXACT:`` paragraph."""
    text = "".join(f"# {line}\n" for line in comments)
    for note in notes:
        lines = textwrap.wrap(f"NOT EXACT: {note}", width=100, subsequent_indent="  ", break_long_words=False)
        text += "".join(f"# {line}\n" for line in lines)
    # block style, never folded: lora_target is one long comma-separated string
    return text + yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=1 << 30)


def _ranks(plan: PlanLike) -> str:
    """``"r=16, alpha=32; mlp.up_proj: r=64, alpha=128; ..."``: the default and each module's own."""
    lora = plan.lora_config
    parts = [f"r={lora.r}, alpha={_number(lora.lora_alpha)}"]
    for key in dict.fromkeys([*lora.rank_pattern, *lora.alpha_pattern]):  # keys are re.escape'd names
        rank, alpha = lora.rank_pattern.get(key, lora.r), lora.alpha_pattern.get(key, lora.lora_alpha)
        name = key.replace("\\", "")
        parts.append(f"{name}: r={rank}, alpha={_number(alpha)}")
    return "; ".join(parts)


def _axolotl(plan: PlanLike) -> str:
    lora = _lora(plan)
    notes = []
    data: dict[str, Any] = {"adapter": "lora"}
    if plan.base_model:
        data["base_model"] = plan.base_model
    data |= {
        "lora_r": lora["r"],
        "lora_alpha": _number(lora["lora_alpha"]),
        "lora_dropout": lora["lora_dropout"],
        "lora_target_linear": False,  # true would add every linear module to the targets
    }
    if not isinstance(data["lora_alpha"], int):
        notes.append(
            f"axolotl's schema types lora_alpha as an integer; this plan's is {data['lora_alpha']}. If your "
            f"axolotl rejects it, scale lora_r and lora_alpha to integers with the same ratio."
        )
    if lora["target_modules"]:
        data["lora_target_modules"] = lora["target_modules"]
        data["peft_layers_to_transform"] = lora["layers_to_transform"]
        data["peft_layers_pattern"] = [lora["layers_pattern"]]
    if lora["target_parameters"]:
        data["lora_target_parameters"] = lora["target_parameters"]
    if lora["rank_pattern"]:
        data["lora_rank_pattern"] = {k: _number(v) for k, v in lora["rank_pattern"].items()}
    if lora["alpha_pattern"]:
        data["lora_alpha_pattern"] = {k: _number(v) for k, v in lora["alpha_pattern"].items()}
    if lora["fan_in_fan_out"]:
        data["lora_fan_in_fan_out"] = True
    for key in ("use_dora", "use_rslora"):
        if lora[key]:
            data[f"peft_{key}"] = True
    init = lora["init_lora_weights"]
    if init is False:  # axolotl passes peft_init_lora_weights only when truthy
        notes.append(
            "axolotl passes peft_init_lora_weights to PEFT only when it is truthy, so init_lora_weights: false "
            "(random A and B) cannot be said; axolotl will start from PEFT's default (B = 0). Use the peft export."
        )
    elif init is not True:
        data["peft_init_lora_weights"] = init
    comments = _header(
        plan, "axolotl", "axolotl reads them (src/axolotl/loaders/adapter.py, commit 01883e35e2f4)"
    )
    if "lora_rank_pattern" in data or "lora_alpha_pattern" in data:
        comments.append(
            "lora_rank_pattern / lora_alpha_pattern need axolotl >= 0.18.0; older versions drop them silently "
            f"and train every module at lora_r {lora['r']}."
        )
    comments.append("Merge into your axolotl config, replacing its lora_* and peft_layers_* keys.")
    return _yaml(comments, notes, data)


def _llama_factory(plan: PlanLike) -> str:
    lora = _lora(plan)
    blocks = plan.blocks_path or lora["layers_pattern"]  # the block path itself, also on multimodal wrappers
    names = [
        f"{blocks}.{i}.{name}"
        for i in lora["layers_to_transform"] or []
        for name in lora["target_modules"] or []
    ]
    if not names:  # without lora_target LLaMA-Factory adapts every linear module: no faithful form
        raise ValueError(
            f"this plan adapts only parameters ({', '.join(lora['target_parameters'] or [])}), which LLaMA-Factory "
            f"cannot target; use the peft or axolotl export."
        )
    notes = []
    if lora["rank_pattern"] or lora["alpha_pattern"]:
        notes.append(
            f"LLaMA-Factory has one lora_rank and lora_alpha for every module; this plan's ranks differ by module "
            f"({_ranks(plan)}). Written: lora_rank {lora['r']}, lora_alpha {_number(lora['lora_alpha'])} for all. "
            f"For the exact ranks, train with the peft export (aletheia-lora probe --export peft)."
        )
    if lora["target_parameters"]:
        notes.append(
            f"LLaMA-Factory cannot target parameters; these MoE expert tensors are NOT adapted by this snippet: "
            f"{', '.join(lora['target_parameters'])}. Use the peft or axolotl export to adapt them."
        )
    data: dict[str, Any] = {}
    if plan.base_model:
        data["model_name_or_path"] = plan.base_model
    data |= {
        "finetuning_type": "lora",
        "lora_rank": lora["r"],
        "lora_alpha": _number(lora["lora_alpha"]),
        "lora_dropout": lora["lora_dropout"],
    }
    if not isinstance(data["lora_alpha"], int):
        notes.append(
            f"LLaMA-Factory types lora_alpha as an integer; this plan's is {data['lora_alpha']}. Scale lora_rank "
            f"and lora_alpha to integers with the same ratio."
        )
    for key in ("use_dora", "use_rslora"):
        if lora[key]:
            data[key] = True
    if lora["init_lora_weights"] is not True:
        notes.append(
            f"LLaMA-Factory's only LoRA initializations are PEFT's default and pissa_init; this plan's "
            f"init_lora_weights is {lora['init_lora_weights']!r}. Written: the default (B = 0). For the exact "
            f"initialization, train with the peft export."
        )
    data["lora_target"] = ",".join(names)
    comments = _header(
        plan,
        "LLaMA-Factory",
        "LLaMA-Factory reads them (src/llamafactory/hparams/finetuning_args.py, commit 00577a85775a)",
    )
    comments += [
        "LLaMA-Factory has no layer index: lora_target names each module of the selected layers in full",
        "(comma-separated, as lora_target takes it). Merge into your LLaMA-Factory training YAML.",
    ]
    return _yaml(comments, notes, data)


__all__ = ["EXPORT_FILES", "EXPORT_FORMATS", "check_format", "export_plan"]
