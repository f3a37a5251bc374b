"""Task metrics: answer extraction, held-out loss, greedy exact match."""

from __future__ import annotations

import math

import torch
from conftest import tiny_model, token_rows, word_tokenizer

from aletheia_lora.batches import collate
from aletheia_lora.evaluation import exact_match, extract_answer, mean_loss


def test_extract_answer_prefers_the_gsm8k_marker_then_the_last_number():
    assert extract_answer("3 + 4 = 7\n#### 7") == "7"
    assert extract_answer("#### 1,234") == "1234"
    assert extract_answer("so he has 14 - 2 = 12 cards left.") == "12"
    assert extract_answer("3.50 dollars") == "3.5"
    assert extract_answer("no numbers here") is None


def test_mean_loss_is_the_token_weighted_mean_over_targets():
    model = tiny_model("llama", num_layers=2)
    rows = token_rows(3)
    rows[1]["labels"] = [-100] * 4 + rows[1]["input_ids"][4:]
    got = mean_loss(model, rows, batch_size=2)
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            batch = collate([row])
            logits = model(input_ids=batch["input_ids"]).logits[0, :-1]
            labels = batch["labels"][0, 1:]
            keep = labels != -100
            total += torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum").item()
            count += int(keep.sum())
    assert math.isclose(got, total / count, rel_tol=1e-5)
    model.train()
    assert mean_loss(model, rows) == got  # dropout is off during evaluation
    assert model.training, "mean_loss must restore train mode"


def test_exact_match_decodes_greedily_and_restores_the_tokenizer():
    tokenizer = word_tokenizer()
    model = tiny_model("llama", num_layers=2)
    model.config.vocab_size = len(tokenizer)
    rows = [
        {"question": "the cat sat on the mat", "answer": "#### 2"},
        {"question": "a dog ran", "answer": "#### 1"},
    ]
    side = tokenizer.padding_side
    result = exact_match(model, tokenizer, rows, max_new_tokens=3)
    assert result["n"] == 2 and 0.0 <= result["exact_match"] <= 1.0
    assert len(result["examples"]) == 2 and {"question", "output", "gold", "correct"} <= set(
        result["examples"][0]
    )
    assert tokenizer.padding_side == side
    again = exact_match(model, tokenizer, rows, max_new_tokens=3)
    assert again == result  # greedy decoding is deterministic
