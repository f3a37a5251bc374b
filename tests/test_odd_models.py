"""Models at the edges: one layer, every score tied, already wrapped by PEFT, fp16 on a CPU."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_model, token_rows
from peft import get_peft_model

from aletheia_lora import LayerScores, apply_aletheia_lora, gradient_probe, prepare_model, select_layers


def test_one_layer_model_trains_its_only_layer():
    peft_model, plan = prepare_model(tiny_model("llama", num_layers=1), token_rows(4), probe_batches=2)
    assert plan.selected_layers == [0]
    assert plan.trainable_params == plan.all_layer_trainable_params > 0


def test_all_scores_tied_selects_the_lowest_indices():
    scores = LayerScores(dict.fromkeys(range(6), 1.0))
    assert select_layers(scores, top_pct=50) == [0, 1, 2]


def test_a_peft_model_is_refused_with_the_fix():
    model = tiny_model("llama", num_layers=4)
    peft_model = get_peft_model(model, apply_aletheia_lora(model, [1]))
    with pytest.raises(TypeError, match=r"get_base_model\(\)"):
        prepare_model(peft_model, token_rows(4), probe_batches=2)
    with pytest.raises(TypeError, match="already a PEFT model"):
        apply_aletheia_lora(peft_model, [2])


def test_fp16_model_on_cpu_is_probed_in_fp32_and_stays_fp16():
    model = tiny_model("llama", num_layers=4).half()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    scores = gradient_probe(model, token_rows(4), probe_batches=2)
    assert scores.meta["dtype"] == "float32"
    assert all(torch.isfinite(torch.tensor(v)) for v in scores.values())
    for n, p in model.named_parameters():
        assert p.dtype == torch.float16 and torch.equal(p, before[n])


def test_tied_embeddings_are_not_adapted_or_probed():
    model = tiny_model("gemma", num_layers=2)  # Gemma ties lm_head to the input embeddings
    assert model.lm_head.weight is model.get_input_embeddings().weight
    scores = gradient_probe(model, token_rows(4), probe_batches=2)
    assert not any(
        "embed" in name or "lm_head" in name for layer in scores.modules.values() for name in layer
    )
    config = apply_aletheia_lora(model, [1])
    assert not any("embed" in t or "lm_head" in t for t in config.target_modules)


class _Block(torch.nn.Module):
    def __init__(self, width: int, hidden: int = 16):
        super().__init__()
        self.attn = torch.nn.Module()
        self.attn.q_proj = torch.nn.Linear(hidden, hidden)
        self.mlp = torch.nn.Module()
        self.mlp.up_proj = torch.nn.Linear(hidden, width)
        self.mlp.down_proj = torch.nn.Linear(width, hidden)

    def forward(self, x):
        return x + self.mlp.down_proj(torch.relu(self.mlp.up_proj(self.attn.q_proj(x))))


class _UnevenLM(torch.nn.Module):
    """A causal LM whose blocks have different MLP widths (8, 32, 64)."""

    def __init__(self, widths=(8, 32, 64), vocab: int = 128, hidden: int = 16):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.layers = torch.nn.ModuleList(_Block(w, hidden) for w in widths)
        self.head = torch.nn.Linear(hidden, vocab)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, attention_mask=None, **kwargs):
        x = self.embed(input_ids)
        for block in self.layers:
            x = block(x)
        return SimpleNamespace(logits=self.head(x))


def test_blocks_of_different_widths_are_probed_costed_and_adapted():
    from aletheia_lora.lora_config import lora_param_count

    model = _UnevenLM()
    scores = gradient_probe(model, token_rows(4), probe_batches=2)
    onepass_vs_chunked = gradient_probe(model, token_rows(4), probe_batches=2, method="chunked")
    for layer in scores:
        assert scores[layer] == pytest.approx(onepass_vs_chunked[layer], rel=1e-4)
    config = apply_aletheia_lora(model, [0, 2], r=2, task_type=None)
    expected = sum(2 * (w.in_features + w.out_features) for i in (0, 2) for w in _linears(model.layers[i]))
    assert lora_param_count(model, config) == expected
    peft_model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable == expected


def _linears(block):
    return [m for m in block.modules() if isinstance(m, torch.nn.Linear)]
