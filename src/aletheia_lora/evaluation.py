"""Task metrics: held-out loss and exact-match accuracy of numeric answers (greedy decoding)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .batches import IGNORE_INDEX, collate
from .data import encode_prompt, extract_final_answer, format_prompt

_NUMBER = re.compile(r"-?\d[\d,]*\.?\d*")


def extract_answer(text: str) -> str | None:
    """The number after ``####`` (GSM8K style), else the last number in ``text``; commas dropped."""
    value = extract_final_answer(text)
    if value is None:
        numbers = _NUMBER.findall(text)
        if not numbers:
            return None
        value = numbers[-1]
    value = value.replace(",", "").rstrip(".")
    if "." in value:
        value = value.rstrip("0").rstrip(".")
    return value


@torch.no_grad()
def mean_loss(model: nn.Module, rows: Sequence[dict], *, batch_size: int = 8, pad_token_id: int = 0) -> float:
    """Mean next-token loss over all target tokens (labels != -100) of tokenized ``rows``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for i in range(0, len(rows), batch_size):
            batch = {k: v.to(device) for k, v in collate(rows[i : i + batch_size], pad_token_id).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logits, labels = logits[:, :-1].float(), batch["labels"][:, 1:]
            loss = nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]),
                labels.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            total += loss.item()
            count += int((labels != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    return total / count if count else math.nan


@torch.no_grad()
def exact_match(
    model: nn.Module,
    tokenizer: Any,
    rows: Sequence[dict],
    *,
    batch_size: int = 16,
    max_new_tokens: int = 48,
) -> dict[str, Any]:
    """Greedy-decode an answer to each ``{"question", "answer"}`` row and compare final numbers.

    Returns ``{"exact_match": fraction, "n": count, "examples": [first few (question, output, gold)]}``.
    """
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    correct, examples = 0, []
    try:
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            ids = [encode_prompt(format_prompt(r["question"], tokenizer), tokenizer) for r in chunk]
            enc = tokenizer.pad({"input_ids": ids}, return_tensors="pt").to(device)  # as training saw them
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            for row, text in zip(chunk, texts):
                gold = extract_answer(row["answer"])
                ok = gold is not None and extract_answer(text) == gold
                correct += ok
                if len(examples) < 3:
                    examples.append(
                        {"question": row["question"], "output": text.strip(), "gold": gold, "correct": ok}
                    )
    finally:
        model.train(was_training)
        tokenizer.padding_side = side
    return {"exact_match": correct / max(1, len(rows)), "n": len(rows), "examples": examples}
