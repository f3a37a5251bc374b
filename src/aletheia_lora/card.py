"""The model card (``README.md``) of an adapter folder: what the adapter is, which layers it adapts and
why, its ranks, its numbers, and how to load it.

    text = model_card(record)             # record: what `train` writes to aletheia.json
    save_with_card(peft_model, plan, "out/")   # after prepare_model + your own training

The YAML front matter is built with ``huggingface_hub``'s ``ModelCardData`` (``base_model``,
``library_name: peft``, ``tags``, ``datasets``, ``pipeline_tag``), so the Hub indexes the adapter
under its base model.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from .io import atomic_write_text
from .models import looks_like_path
from .plan import AletheiaPlan
from .report import exact_match_note, significant, speed_line, table_lines
from .runs import PLAN_FILE, save_adapter, versions

CARD_FILE = "README.md"
TAGS = ["lora", "peft", "aletheia-lora", "text-generation"]
PLOT_FILE = "layer_scores.png"
# Placeholder of the adapter's location in the card's loading snippet, when it has no Hub id.
ADAPTER_PLACEHOLDER = "path/to/this/folder"


def _hub_dataset(data: Any) -> str | None:
    """``data`` if it names a Hub dataset (``org/name``), else ``None`` (a file, a folder, the embedded task)."""
    if not isinstance(data, str) or not data or looks_like_path(data) or Path(data).exists():
        return None
    return data if "/" in data else None


def _rank_rows(lora: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(weights, rank, alpha), the weights grouped by (rank, alpha): one row per kind that trains alike."""
    ranks, alphas = lora.get("rank_pattern") or {}, lora.get("alpha_pattern") or {}
    names = [*(lora.get("target_modules") or [])]
    names += [re.sub(r"^.*?\.\d+\.", "", p) for p in lora.get("target_parameters") or []]  # block-relative
    groups: dict[tuple[Any, Any], list[str]] = {}
    for name in dict.fromkeys(names):
        key = re.escape(name)  # as lora_config writes the pattern keys
        groups.setdefault((ranks.get(key, lora["r"]), alphas.get(key, lora["lora_alpha"])), []).append(name)
    return [(", ".join(f"`{n}`" for n in mods), r, _g(a)) for (r, a), mods in groups.items()]


def _variant_line(lora: Mapping[str, Any]) -> str:
    """Dropout, scaling, and DoRA / rsLoRA / the initialization when they are not plain LoRA's."""
    scaling = "alpha / sqrt(rank) (rsLoRA)" if lora.get("use_rslora") else "alpha / rank"
    line = f"LoRA dropout {lora.get('lora_dropout', 0)}; the update of each weight is scaled by {scaling}."
    if lora.get("use_dora"):
        line += " DoRA (weight-decomposed LoRA): each adapted weight also trains a magnitude vector."
    init = lora.get("init_lora_weights", True)
    if init is not True:
        line += f" LoRA weights initialized with PEFT's `init_lora_weights={init!r}`."
    return line


def _g(x: Any) -> Any:
    return int(x) if isinstance(x, float) and x.is_integer() else x


def _base_lines(base: Mapping[str, Any]) -> list[str]:
    kind, name = base.get("kind"), base.get("name")
    if kind == "embedded":
        sha = base.get("gguf_sha256")
        return [
            f"Base model: [{name}](https://huggingface.co/{name}). The adapter was trained on aletheia-lora's "
            f"embedded copy of it, the 4-bit GGUF `{base.get('gguf_file')}`"
            + (f" (sha256 `{sha}`)" if sha else "")
            + " dequantized to float32; on the public float weights it applies up to that quantization error. "
            "`aletheia_lora.load_model(None)` loads the exact weights it was trained on."
        ]
    if kind in ("local", "gguf"):
        return [
            f"Base model: the local {'folder' if kind == 'local' else 'GGUF file'} `{name}` (not a Hugging Face Hub "
            f"id, so `base_model` is not set above). Load it from that path, or replace the path with the model's "
            f"Hub id."
        ]
    return [f"Base model: [{name}](https://huggingface.co/{name})."] if name else []


def _selection_lines(plan: Mapping[str, Any], record: Mapping[str, Any], plot: bool) -> list[str]:
    config = plan.get("config") or {}
    layers, n = plan.get("selected_layers") or [], plan.get("num_layers")
    budget = f"top_k {config['top_k']}" if config.get("top_k") else f"top_pct {config.get('top_pct')}"
    if config.get("target_speedup"):
        budget += f", target speedup {config['target_speedup']}x"
    lines = [
        "## Selected layers and why",
        "",
        f"LoRA on {len(layers)} of {n} decoder layers: {', '.join(map(str, layers))}.",
        "",
        f"aletheia-lora's gradient probe ({config.get('probe_batches')} batches, {significant(plan.get('probe_seconds', 0), 2)} s) "
        f"scored every layer by `{config.get('score')}`; the `{config.get('strategy')}` strategy picked the layers "
        f"within the budget ({budget}). Trainable parameters: {plan.get('trainable_params', 0):,} "
        f"({plan.get('trainable_params', 0) / max(1, plan.get('all_layer_trainable_params') or 1):.0%} of LoRA on "
        f"every layer at the same ranks).",
    ]
    speed = speed_line(plan.get("predicted_speedup"), plan.get("calibration"),
                       record.get("train_seconds_per_step"), record.get("device"))  # fmt: skip
    if speed:
        lines += ["", f"Speed: {speed}."]
    if plot:
        lines += ["", f"![per-layer probe scores, selected layers marked]({PLOT_FILE})"]
    return lines + [""]


def _metric_lines(record: Mapping[str, Any]) -> list[str]:
    before, after = record.get("metrics_before") or {}, record.get("metrics_after") or {}
    rows = [
        (key, f"{before[key]:.4f}", f"{after[key]:.4f}")
        for key in ("eval_loss", "exact_match")
        if isinstance(before.get(key), (int, float)) and isinstance(after.get(key), (int, float))
    ]
    if not rows:
        return []
    lines = [
        "## Held-out metrics before and after training",
        "",
        *table_lines(("metric", "before", "after"), rows),
    ]
    note = exact_match_note(after)
    return lines + (["", f"{note[0].upper()}{note[1:]}."] if note else []) + [""]


def _training_lines(record: Mapping[str, Any]) -> list[str]:
    settings = record.get("settings") or {}
    training, data = settings.get("training") or {}, settings.get("data") or {}
    rows = [
        ("data", data.get("data") or "the embedded arithmetic task"),
        ("format", data.get("format")),
        ("max_length", data.get("max_length")),
        ("steps", record.get("train_steps")),
        ("learning_rate", training.get("learning_rate")),
        ("per_device_train_batch_size", training.get("per_device_train_batch_size")),
        ("gradient_accumulation_steps", training.get("gradient_accumulation_steps")),
        ("seed", record.get("seed")),
        ("device", record.get("device")),
    ]
    rows = [(k, v) for k, v in rows if v is not None]
    return ["## Training", "", *table_lines(("setting", "value"), rows), ""] if rows else []


def _load_lines(base: Mapping[str, Any], adapter: str) -> list[str]:
    name = base.get("name") or "BASE_MODEL"
    return [
        "## How to load",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'adapter = "{adapter}"  # this folder, or its Hub id',
        f'base = AutoModelForCausalLM.from_pretrained("{name}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
        "model = PeftModel.from_pretrained(base, adapter)",
        "```",
        "",
    ]


def model_card(record: Mapping[str, Any], *, plot: bool = False, adapter: str | None = None) -> str:
    """The ``README.md`` text of an adapter folder from its ``aletheia.json`` ``record`` (plain data).

    Reads ``record["plan"]`` (the selection, ranks, probe), ``record["base_model"]`` (see
    :func:`aletheia_lora.models.base_model_reference`), and when present the metrics before and after,
    the settings, the step time and the versions. ``plot``: embed ``layer_scores.png`` (beside the card);
    ``adapter``: the adapter's Hub id for the loading snippet (default: a path placeholder)."""
    plan = record.get("plan") or {}
    base = record.get("base_model") or {}
    lora = plan.get("lora_config") or {}
    hub_base = base.get("name") if base.get("kind") in ("hub", "embedded") else None
    dataset = _hub_dataset(((record.get("settings") or {}).get("data") or {}).get("data"))
    data = ModelCardData(
        base_model=hub_base,
        library_name="peft",
        tags=TAGS + ([f"base_model:adapter:{hub_base}"] if hub_base else []),
        datasets=[dataset] if dataset else None,
        pipeline_tag="text-generation",
    )
    title = f"LoRA adapter for {base.get('name') or 'a causal LM'} on {len(plan.get('selected_layers') or [])} selected layers"
    lines = [f"# {title}", "", *_base_lines(base), ""]
    lines += _selection_lines(plan, record, plot)
    lines += ["## Ranks and alphas", "", *table_lines(("weights", "rank", "alpha"), _rank_rows(lora)), ""]
    lines += [_variant_line(lora), ""]
    lines += _metric_lines(record)
    lines += _training_lines(record)
    lines += _load_lines(base, adapter or ADAPTER_PLACEHOLDER)
    found = record.get("versions") or {}
    if found:
        lines += ["## Versions", "", *table_lines(("package", "version"), sorted(found.items())), ""]
    lines += [
        f"Made with [aletheia-lora](https://pypi.org/project/aletheia-lora/); the full record is `{PLAN_FILE}`.",
        "",
    ]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
    return str(card)


def write_card(
    output_dir: str | os.PathLike, record: Mapping[str, Any], *, adapter: str | None = None
) -> Path:
    """Write :func:`model_card` to ``output_dir/README.md`` atomically (embedding the plot if it is there)."""
    out = Path(output_dir)
    path = out / CARD_FILE
    atomic_write_text(path, model_card(record, plot=(out / PLOT_FILE).is_file(), adapter=adapter))
    return path


def save_with_card(
    peft_model: Any,
    plan: AletheiaPlan,
    output_dir: str | os.PathLike,
    *,
    base_model: Mapping[str, Any] | None = None,
    **record: Any,
) -> Path:
    """Save a :func:`aletheia_lora.prepare_model` model's adapter with its card (and ``aletheia.json``).

    ``base_model``: :func:`aletheia_lora.models.base_model_reference` of what you loaded (default: the
    plan's ``base_model``, as a Hub id); ``record``: anything else the card reads, e.g.
    ``metrics_before=...``, ``metrics_after=...``, ``seed=...``."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = dict(base_model or {"name": plan.base_model, "kind": "hub"})
    save_adapter(peft_model, out, base_model=base.get("name"))
    full = {"plan": plan.to_dict(), "base_model": base, "versions": versions(), **record}
    atomic_write_text(out / PLAN_FILE, json.dumps(full, indent=1, default=str) + "\n")
    return write_card(out, full)


__all__ = ["CARD_FILE", "model_card", "save_with_card", "write_card"]
