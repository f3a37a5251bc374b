"""Every supported family end to end: probe -> select -> LoraConfig -> PEFT -> one optimizer step."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import FAMILIES, tiny_model, token_rows
from peft import get_peft_model

from aletheia_lora import apply_aletheia_lora, find_blocks, gradient_probe, select_layers
from aletheia_lora.batches import collate

BLOCK_PATHS = {
    "gpt2": "transformer.h",
    "falcon": "transformer.h",
    "bloom": "transformer.h",
    "gpt_neox": "gpt_neox.layers",
    "opt": "model.decoder.layers",
}
MOE = {"mixtral", "qwen2_moe"}


def _lora_ranks(peft_model) -> dict[tuple[int, str], int]:
    """(layer, block-relative weight name) -> LoRA rank, read from the LoRA layers PEFT created."""
    from peft.tuners.lora import LoraLayer

    ranks = {}
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        match = re.search(r"\.(?:layers|h)\.(\d+)\.(.+)$", name.replace(".base_layer", ""))
        assert match, name
        inner = match.group(2)
        if getattr(module, "parameter_name", None):  # a 3-D expert tensor (PEFT ParamWrapper)
            inner = f"{inner}.{module.parameter_name}"
        ranks[(int(match.group(1)), inner)] = module.r["default"]
    return ranks


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_end_to_end(family):
    model = tiny_model(family, num_layers=4)
    arch = find_blocks(model)
    assert arch.blocks_path == BLOCK_PATHS.get(family, "model.layers")
    assert arch.num_layers == 4
    roles = {t.role for t in arch.targets}
    assert {"attention"} <= roles
    assert ("expert" in roles and "router" in roles) if family in MOE else roles == {"attention", "mlp"}

    scores = gradient_probe(model, token_rows(6), probe_batches=3, batch_size=2)
    assert sorted(scores) == [0, 1, 2, 3] and all(v > 0 for v in scores.values())
    selected = select_layers(scores, top_pct=50)
    assert len(selected) == 2

    config = apply_aletheia_lora(model, selected, attention_r=4, mlp_r=8)
    peft_model = get_peft_model(model, config)

    targets = arch.targets  # read after wrapping: detection looks through PEFT layers
    ranks = _lora_ranks(peft_model)
    assert {layer for layer, _ in ranks} == set(selected), "LoRA must sit exactly on the selected layers"
    adapted = {t.name for t in targets if t.role != "router"}
    for layer in selected:
        names = {name for lay, name in ranks if lay == layer}
        assert names == adapted, f"layer {layer}: adapted {names}, expected {adapted}"
    for (layer, name), rank in ranks.items():
        role = next(t.role for t in targets if t.name == name)
        assert rank == (4 if role == "attention" else 8), (layer, name, role, rank)

    # One optimizer step moves LoRA weights and nothing else.
    trainable = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    frozen_before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    batch = collate(token_rows(2, seed=1)[:2])
    peft_model.train()
    loss = peft_model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    moved = [
        n for n, p in peft_model.named_parameters() if p.requires_grad and not torch.equal(p, trainable[n])
    ]
    assert moved, "the optimizer step changed no LoRA weight"
    for n, p in peft_model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen_before[n]), f"frozen weight {n} changed"
