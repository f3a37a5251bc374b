"""Task metrics: answer extraction, held-out loss, greedy exact match."""

from __future__ import annotations

import math

import torch
import transformers as T
from conftest import WORDS, tiny_model, token_rows, word_tokenizer

from aletheia_lora.batches import collate
from aletheia_lora.data import encode_prompt, format_prompt
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
    assert mean_loss(model, rows, batch_size=2) == got  # dropout is off during evaluation
    assert model.training, "mean_loss must restore train mode"


def test_mean_loss_holds_at_most_its_logit_budget_and_does_not_depend_on_it():
    model = tiny_model("llama", num_layers=2)  # vocabulary 128
    rows = token_rows(6)
    rows[3]["labels"] = [-100] * 5 + rows[3]["input_ids"][5:]  # a completion: logits only where needed
    sizes = []
    model.lm_head.register_forward_hook(lambda m, a, out: sizes.append(out.numel() * 4))
    reference = mean_loss(model, rows, batch_size=8, logit_budget_bytes=2**30)
    budget = 25 * 128 * 4  # the longest row's logits: forces batches of one or two rows
    sizes.clear()
    small = mean_loss(model, rows, batch_size=8, logit_budget_bytes=budget)
    assert math.isclose(small, reference, rel_tol=1e-6)
    assert max(sizes) <= budget and len(sizes) > 2
    sizes.clear()
    mean_loss(model, rows[3:4], logit_budget_bytes=2**30)
    targets = sum(1 for t in rows[3]["labels"][1:] if t != -100)
    assert sizes == [targets * 128 * 4]  # only the positions that predict a target token


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


def _verbose_model():
    """A tiny model taught one long, correct answer: forty words of working, then '#### 7', then EOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [
        "[PAD]",
        "[BOS]",
        "[EOS]",
        "[UNK]",
        "Question",
        "Answer",
        ":",
        "####",
        *WORDS,
        *map(str, range(10)),
    ]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = T.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]", unk_token="[UNK]"
    )
    question = "cat and dog 3 4"
    working = " ".join(WORDS[i % len(WORDS)] for i in range(40))
    prompt = encode_prompt(format_prompt(question, tokenizer), tokenizer)
    answer = tokenizer(f"{working} #### 7", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([prompt + answer])
    labels = torch.tensor([[-100] * len(prompt) + answer])
    torch.manual_seed(0)
    model = tiny_model("llama", num_layers=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer, {"question": question, "answer": "#### 7"}


def test_a_correct_but_verbose_answer_is_not_scored_zero_and_a_cut_one_is_counted():
    model, tokenizer, row = _verbose_model()
    result = exact_match(model, tokenizer, [row])
    assert result["max_new_tokens"] >= 256  # sized from the gold answers, with room for working
    assert result["exact_match"] == 1.0 and result["cut_off"] == 0, result["examples"]
    assert result["examples"][0]["output"].endswith("#### 7")
    cut = exact_match(model, tokenizer, [row], max_new_tokens=20)  # the old fixed budget's failure
    assert cut["exact_match"] == 0.0 and cut["cut_off"] == 1


def test_generation_stops_once_the_answer_is_complete():
    model, tokenizer, row = _verbose_model()
    calls = []
    model.register_forward_hook(lambda m, a, out: calls.append(1))
    result = exact_match(model, tokenizer, [row], max_new_tokens=300)
    assert result["exact_match"] == 1.0
    assert len(calls) < 60  # ~45 answer tokens, then EOS / the complete '#### 7': not 300 steps
