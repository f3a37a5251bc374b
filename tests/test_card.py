"""The published method card's snippets run verbatim (num_layers=36, as printed there)."""

from __future__ import annotations

import datasets
import pytest
from conftest import tiny_model, token_rows


@pytest.fixture(params=["llama", "gpt2"])
def model(request):
    return tiny_model(request.param, num_layers=36)


@pytest.fixture
def train_dataset():
    return datasets.Dataset.from_list(token_rows(8))


def test_card_snippet_symmetric(model, train_dataset):
    # --- verbatim from the card ---
    from peft import get_peft_model

    from aletheia_lora import apply_aletheia_lora, gradient_probe, select_layers

    layer_scores = gradient_probe(model=model, dataset=train_dataset, num_layers=36, probe_batches=5)
    selected_layers = select_layers(layer_scores, top_pct=50)
    peft_config = apply_aletheia_lora(model, selected_layers, r=16, lora_alpha=32)
    model = get_peft_model(model, peft_config)
    # --- end ---
    assert len(selected_layers) == 18
    assert layer_scores.meta["batches"] == 5
    adapted = {n.split(".lora_A")[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    layers = {
        int(n.split(".h.")[-1].split(".")[0]) if ".h." in n else int(n.split(".layers.")[-1].split(".")[0])
        for n in adapted
    }
    assert layers == set(selected_layers)


def test_card_snippet_asymmetric(model, train_dataset):
    from peft import get_peft_model

    from aletheia_lora import apply_aletheia_lora, gradient_probe, select_layers

    layer_scores = gradient_probe(model=model, dataset=train_dataset, num_layers=36, probe_batches=5)
    selected_layers = select_layers(layer_scores, top_pct=50)
    peft_config = apply_aletheia_lora(model, selected_layers, attention_r=16, mlp_r=64)
    model = get_peft_model(model, peft_config)
    ranks = {m.r["default"] for n, m in model.named_modules() if hasattr(m, "r") and isinstance(m.r, dict)}
    assert ranks == {16, 64}
