"""Turn whatever dataset the user has into padded probe batches with a label mask.

Accepted: a ``datasets.Dataset`` or list of dicts with ``input_ids`` (optional
``attention_mask`` and ``labels``), a torch ``Dataset`` yielding such dicts (or bare
``input_ids`` tensors), a ``DataLoader`` (its batches are used as they come), or a list of
strings together with ``tokenizer=``. Labels default to ``input_ids`` with padding masked
to -100; the loss never counts a padding token.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch

IGNORE_INDEX = -100


def _as_list(x: Any) -> list[int]:
    if isinstance(x, torch.Tensor):
        return x.reshape(-1).tolist()
    return list(x)


def _normalise_row(row: Any, tokenizer: Any, max_length: int | None, index: int) -> dict[str, list[int]]:
    if isinstance(row, str) or (isinstance(row, dict) and "input_ids" not in row and "text" in row):
        text = row if isinstance(row, str) else row["text"]
        if tokenizer is None:
            raise ValueError(
                f"dataset row {index} is text ({text[:40]!r}...); pass tokenizer=... so the probe can tokenize it, "
                f"or give rows with 'input_ids'."
            )
        row = {"input_ids": tokenizer(text, add_special_tokens=True)["input_ids"]}
    elif isinstance(row, torch.Tensor):
        row = {"input_ids": row}
    if not isinstance(row, dict) or "input_ids" not in row:
        got = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise ValueError(
            f"dataset row {index} has no 'input_ids' (got {got}); give tokenized rows, or strings with tokenizer=..."
        )
    ids = _as_list(row["input_ids"])
    mask = _as_list(row["attention_mask"]) if row.get("attention_mask") is not None else [1] * len(ids)
    labels = _as_list(row["labels"]) if row.get("labels") is not None else None
    if labels is None:
        labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
    if not (len(ids) == len(mask) == len(labels)):
        raise ValueError(
            f"dataset row {index}: input_ids ({len(ids)}), attention_mask ({len(mask)}) and labels "
            f"({len(labels)}) differ in length"
        )
    if max_length is not None:
        ids, mask, labels = ids[:max_length], mask[:max_length], labels[:max_length]
    labels = [lab if m else IGNORE_INDEX for lab, m in zip(labels, mask)]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate(batch: Sequence[Mapping[str, Any]], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad examples into ``torch.long`` tensors of shape (batch, longest).

    ``input_ids`` are padded with ``pad_token_id``, ``attention_mask`` with 0 and ``labels``
    with -100. A missing ``attention_mask`` means all ones; missing ``labels`` means the
    ``input_ids``. Other keys are dropped.
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    width = max(len(example["input_ids"]) for example in batch)
    ids, masks, labels = [], [], []
    for example in batch:
        row = list(example["input_ids"])
        pad = width - len(row)
        mask = example.get("attention_mask")
        lab = example.get("labels")
        ids.append(row + [pad_token_id] * pad)
        masks.append(list(mask if mask is not None else [1] * len(row)) + [0] * pad)
        labels.append(list(lab if lab is not None else row) + [IGNORE_INDEX] * pad)
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "attention_mask": torch.tensor(masks, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
    }


def _from_loader(loader: Any, n_batches: int, max_length: int | None) -> list[dict[str, torch.Tensor]]:
    batches = []
    for batch in loader:
        if len(batches) == n_batches:
            break
        if not isinstance(batch, dict) or "input_ids" not in batch:
            raise ValueError(
                "DataLoader batches must be dicts with 'input_ids' (and optional attention_mask, labels)"
            )
        ids = torch.as_tensor(batch["input_ids"])
        mask = torch.as_tensor(batch["attention_mask"]) if batch.get("attention_mask") is not None else None
        mask = torch.ones_like(ids) if mask is None else mask
        labels = torch.as_tensor(batch["labels"]) if batch.get("labels") is not None else ids.clone()
        labels = labels.masked_fill(mask == 0, IGNORE_INDEX)
        if max_length is not None:
            ids, mask, labels = ids[:, :max_length], mask[:, :max_length], labels[:, :max_length]
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def probe_batches(
    dataset: Any,
    n_batches: int,
    batch_size: int = 1,
    *,
    max_length: int | None = None,
    seed: int = 42,
    tokenizer: Any = None,
) -> list[dict[str, torch.Tensor]]:
    """Draw ``n_batches`` batches of ``batch_size`` rows, in an order fixed by ``seed``.

    Fewer rows than ``n_batches * batch_size``: the probe uses what exists (the last batch
    may be smaller, fewer batches may run) and warns. An empty dataset is an error.
    """
    if n_batches < 1:
        raise ValueError(f"probe_batches={n_batches}; it must be >= 1 (5 is the default).")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; it must be >= 1.")
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length={max_length}; it must be >= 2 (one token to predict another) or None.")
    if isinstance(dataset, torch.utils.data.DataLoader):
        batches = _from_loader(dataset, n_batches, max_length)
        if not batches:
            raise ValueError("the DataLoader yielded no batches; the probe needs at least one.")
        if len(batches) < n_batches:
            warnings.warn(
                f"the DataLoader gave {len(batches)} batches, fewer than probe_batches={n_batches}; "
                f"probing those.",
                stacklevel=3,
            )
        return batches

    try:
        n = len(dataset)
    except TypeError as err:
        raise TypeError(
            f"dataset of type {type(dataset).__name__} has no len(); pass a datasets.Dataset, a list of dicts "
            f"or strings, a torch Dataset, or a DataLoader."
        ) from err
    if n == 0:
        raise ValueError("the dataset is empty; the probe needs at least one example with a target token.")
    wanted = n_batches * batch_size
    if n < wanted:
        warnings.warn(
            f"the dataset has {n} examples, fewer than probe_batches * batch_size = {wanted}; probing all {n} "
            f"of them ({-(-n // batch_size)} batches).",
            stacklevel=3,
        )
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator)[: min(n, wanted)].tolist()
    pad_id = 0
    if tokenizer is not None and getattr(tokenizer, "pad_token_id", None) is not None:
        pad_id = tokenizer.pad_token_id
    rows = [_normalise_row(dataset[i], tokenizer, max_length, i) for i in order]
    return [collate(rows[i : i + batch_size], pad_id) for i in range(0, len(rows), batch_size)]
