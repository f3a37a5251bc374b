"""Block-stack detection, roles, and the fallbacks for unknown models."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from torch import nn

from aletheia_lora import apply_aletheia_lora, block_targets, find_blocks
from aletheia_lora.architecture import guess_role, probed_parameters


class _Block(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.attn_in = nn.Linear(d, d)
        self.ffn = nn.Linear(d, d)


class _Custom(nn.Module):
    """An unknown architecture: its blocks sit at `backbone.stack`."""

    def __init__(self, n=3):
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.stack = nn.ModuleList(_Block() for _ in range(n))
        self.heads = nn.ModuleList([nn.Linear(8, 8)])  # a shorter list that must not win


def test_unknown_model_falls_back_to_largest_block_list():
    arch = find_blocks(_Custom(3))
    assert arch.blocks_path == "backbone.stack"
    assert arch.num_layers == 3
    assert [(t.name, t.role, t.kind) for t in arch.targets] == [
        ("attn_in", "attention", "linear"),
        ("ffn", "mlp", "linear"),
    ]


def test_explicit_layers_path_overrides_detection():
    model = _Custom(3)
    assert find_blocks(model, layers_path="heads").num_layers == 1


def test_no_block_stack_error_says_how_to_pass_it():
    with pytest.raises(ValueError, match=r"layers_path='model.layers'"):
        find_blocks(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(ValueError, match=r"layers_path='nope'"):
        find_blocks(_Custom(), layers_path="nope")


def test_roles_of_known_names():
    assert guess_role("self_attn.q_proj") == "attention"
    assert guess_role("attention.query_key_value") == "attention"
    assert guess_role("q_proj") == "attention"
    assert guess_role("mlp.down_proj") == "mlp"
    assert guess_role("fc1") == "mlp"
    assert guess_role("mlp.experts.gate_up_proj") == "expert"


def test_moe_router_is_probed_but_not_adapted_by_default():
    model = tiny_model("qwen2_moe", num_layers=2)
    targets = {t.name: t.role for t in block_targets(model.model.layers[0])}
    assert targets["mlp.gate.weight"] == "router"
    assert targets["mlp.shared_expert_gate"] == "router"
    assert targets["mlp.experts.gate_up_proj"] == "expert"
    assert "mlp.gate.weight" in probed_parameters(model.model.layers[0], "lora-targets")
    config = apply_aletheia_lora(model, [1])
    assert "mlp.shared_expert_gate" not in config.target_modules
    with_router = apply_aletheia_lora(model, [1], include_router=True)
    assert "mlp.shared_expert_gate" in with_router.target_modules


def test_params_all_includes_norms_and_biases():
    model = tiny_model("phi", num_layers=2)
    block = model.model.layers[0]
    targets = probed_parameters(block, "lora-targets")
    everything = probed_parameters(block, "all")
    assert "input_layernorm.weight" in everything and "input_layernorm.weight" not in targets
    assert "mlp.fc1.bias" in everything and "mlp.fc1.bias" not in targets
    assert set(targets) < set(everything)
    assert all(p.is_floating_point() for p in everything.values())
    with pytest.raises(ValueError, match="params='some'"):
        probed_parameters(block, "some")


def test_fused_projections_keep_their_role():
    model = tiny_model("phi3", num_layers=2)
    roles = {t.name: t.role for t in block_targets(model.model.layers[0])}
    assert roles == {
        "self_attn.qkv_proj": "attention",
        "self_attn.o_proj": "attention",
        "mlp.gate_up_proj": "mlp",
        "mlp.down_proj": "mlp",
    }


def test_gpt2_conv1d_targets_get_fan_in_fan_out():
    model = tiny_model("gpt2", num_layers=2)
    kinds = {t.kind for t in block_targets(model.transformer.h[0])}
    assert kinds == {"conv1d"}
    assert apply_aletheia_lora(model, [0]).fan_in_fan_out is True


def test_detection_sees_through_a_peft_model():
    from peft import get_peft_model

    model = tiny_model("llama", num_layers=2)
    before = find_blocks(model).targets
    peft_model = get_peft_model(model, apply_aletheia_lora(model, [1]))
    arch = find_blocks(peft_model)
    assert arch.num_layers == 2
    assert arch.targets_of(1) == before
    assert torch.is_tensor(next(iter(probed_parameters(arch.blocks[1], "lora-targets").values())))


def test_public_api_is_complete_and_lazy():
    import subprocess
    import sys

    import aletheia_lora

    assert sorted(aletheia_lora.__all__) == sorted(aletheia_lora._EXPORTS)
    for name in aletheia_lora.__all__:
        assert getattr(aletheia_lora, name) is not None
    code = "import sys, aletheia_lora; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False", "import aletheia_lora must not import torch until a name is used"
