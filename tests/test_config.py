"""apply_aletheia_lora / aletheia_lora_config: which modules get LoRA, with which rank and scaling."""

from __future__ import annotations

import re
import warnings

import peft
import pytest
import torch
import transformers as T
from conftest import tiny_config, tiny_model, token_rows

from aletheia_lora import aletheia_lora_config, apply_aletheia_lora, gradient_probe, select_layers

LAYER_RE = re.compile(r"\.(?:layers|h)\.(\d+)\.")


def _peft(model, config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, config)


def _lora_layers(peft_model):
    """name -> LoRA layer (Linear/Conv1D replacements and ParamWrappers) of the 'default' adapter."""
    out = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer) and "default" in module.lora_A:
            out[name] = module  # nested ParamWrappers (`...experts.base_layer`) are listed too
    return out


def _layer_of(name: str) -> int:
    match = LAYER_RE.search(name)
    assert match, name
    return int(match.group(1))


def _is_attention(name: str) -> bool:
    return any(w in name for w in ("attn", "attention"))


# --------------------------------------------------------------------------- placement


@pytest.mark.parametrize(
    ("family", "per_layer"),
    [("llama", 7), ("gpt2", 4), ("opt", 6), ("gpt_neox", 4), ("phi3", 4), ("falcon", 4)],
)
def test_only_selected_layers_are_adapted(family, per_layer):
    model = tiny_model(family, 4)
    names_before = [n for n, _ in model.named_parameters()]
    config = apply_aletheia_lora(model, [3, 1], r=4, lora_alpha=8)
    # The model itself is not modified by building the config.
    assert [n for n, _ in model.named_parameters()] == names_before
    assert sorted(config.layers_to_transform) == [1, 3]
    lora = _lora_layers(_peft(model, config))
    layers = sorted({_layer_of(n) for n in lora})
    assert layers == [1, 3]
    for layer in (1, 3):
        assert sum(_layer_of(n) == layer for n in lora) == per_layer


def test_default_rank_and_scaling_everywhere():
    model = tiny_model("llama", 4)
    lora = _lora_layers(_peft(model, apply_aletheia_lora(model, [0, 2], r=4, lora_alpha=12)))
    assert len(lora) == 14
    for module in lora.values():
        assert module.r["default"] == 4
        assert module.scaling["default"] == pytest.approx(3.0)
        assert module.lora_A["default"].weight.shape[0] == 4


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "phi3"])
def test_per_role_ranks_keep_alpha_over_r(family):
    model = tiny_model(family, 2)
    config = apply_aletheia_lora(model, [0, 1], r=4, lora_alpha=8, attention_r=2, mlp_r=16)
    lora = _lora_layers(_peft(model, config))
    seen = set()
    for name, module in lora.items():
        rank = 2 if _is_attention(name) else 16
        seen.add(rank)
        assert module.r["default"] == rank, name
        assert module.lora_A["default"].weight.shape[0] == rank, name
        assert module.scaling["default"] == pytest.approx(8 / 4), name  # lora_alpha / r in every part
    assert seen == {2, 16}


def test_only_mlp_rank_given():
    model = tiny_model("llama", 2)
    lora = _lora_layers(_peft(model, apply_aletheia_lora(model, [1], r=8, lora_alpha=16, mlp_r=32)))
    for name, module in lora.items():
        expected = 8 if _is_attention(name) else 32
        assert module.r["default"] == expected
        assert module.scaling["default"] == pytest.approx(2.0)


def test_explicit_alphas_are_respected():
    model = tiny_model("llama", 2)
    config = apply_aletheia_lora(
        model, [0], r=4, lora_alpha=8, attention_r=8, mlp_r=16, attention_alpha=4, mlp_alpha=64
    )
    lora = _lora_layers(_peft(model, config))
    for name, module in lora.items():
        if _is_attention(name):
            assert module.r["default"] == 8
            assert module.scaling["default"] == pytest.approx(4 / 8)
        else:
            assert module.r["default"] == 16
            assert module.scaling["default"] == pytest.approx(64 / 16)


def test_explicit_alpha_without_rank():
    model = tiny_model("llama", 2)
    lora = _lora_layers(_peft(model, apply_aletheia_lora(model, [0], r=4, lora_alpha=8, mlp_alpha=2)))
    for name, module in lora.items():
        assert module.r["default"] == 4
        assert module.scaling["default"] == pytest.approx(2.0 if _is_attention(name) else 0.5)


def test_target_modules_restricts_adaptation():
    model = tiny_model("llama", 4)
    config = apply_aletheia_lora(model, [2], target_modules=["q_proj", "mlp.down_proj"], r=2, lora_alpha=4)
    lora = _lora_layers(_peft(model, config))
    assert sorted(lora) == [
        "base_model.model.model.layers.2.mlp.down_proj",
        "base_model.model.model.layers.2.self_attn.q_proj",
    ]


def test_peft_model_runs_forward_and_only_lora_trains():
    model = tiny_model("gpt2", 3)
    config = apply_aletheia_lora(model, [1], r=2, lora_alpha=4)
    pm = _peft(model, config)
    assert type(pm).__name__ == "PeftModelForCausalLM"
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and ".h.1." in n for n in trainable)
    ids = torch.tensor([token_rows(1)[0]["input_ids"]])
    out = pm(input_ids=ids, labels=ids)
    assert torch.isfinite(out.loss)


def test_end_to_end_probe_select_apply():
    model = tiny_model("llama", 4, seed=2)
    scores = gradient_probe(model, token_rows(6), probe_batches=3)
    layers = select_layers(scores, top_pct=50)
    lora = _lora_layers(_peft(model, apply_aletheia_lora(model, layers, r=2, lora_alpha=4)))
    assert sorted({_layer_of(n) for n in lora}) == layers


# --------------------------------------------------------------------------- MoE


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_moe_experts_get_mlp_rank(family):
    model = tiny_model(family, 2)
    num_experts = 4
    config = apply_aletheia_lora(model, [1], r=4, lora_alpha=8, attention_r=2, mlp_r=6)
    assert config.target_parameters, "3-D expert tensors must be targeted"
    assert all(p.startswith("model.layers.1.") for p in config.target_parameters)
    lora = _lora_layers(_peft(model, config))
    wrappers = {n: m for n, m in lora.items() if isinstance(m, peft.tuners.lora.ParamWrapper)}
    assert {m.parameter_name for m in wrappers.values()} == {"gate_up_proj", "down_proj"}
    for name, module in wrappers.items():
        assert _layer_of(name) == 1
        assert module.r["default"] == 6
        assert module.lora_A["default"].weight.shape[0] == num_experts * 6
        assert module.scaling["default"] == pytest.approx(2.0)
    for name, module in lora.items():
        if name in wrappers:
            continue
        assert _layer_of(name) == 1
        expected = 2 if _is_attention(name) else 6  # qwen2_moe shared expert: MLP rank
        assert module.r["default"] == expected, name
        assert module.scaling["default"] == pytest.approx(2.0), name
    # routers are not adapted by default
    assert not any(n.endswith((".gate", "shared_expert_gate")) for n in lora)


def test_moe_layer_selection_excludes_unselected_experts():
    model = tiny_model("mixtral", 3)
    lora = _lora_layers(_peft(model, apply_aletheia_lora(model, [0, 2], r=2, lora_alpha=4)))
    assert sorted({_layer_of(n) for n in lora}) == [0, 2]


def test_heterogeneous_moe_target_missing_in_selected_layer():
    config = tiny_config("qwen2_moe", 2)
    config.mlp_only_layers = [0]  # layer 0 is dense, layer 1 sparse
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError) as err:
        apply_aletheia_lora(model, [0], target_modules=["experts.gate_up_proj"])
    assert "mlp.gate_proj" in str(err.value)  # the available names are listed
    ok = apply_aletheia_lora(model, [1], target_modules=["experts.gate_up_proj"], r=2, lora_alpha=4)
    assert ok.target_parameters == ["model.layers.1.mlp.experts.gate_up_proj"]


# --------------------------------------------------------------------------- config without a model


def test_config_without_model_matches_llama():
    config = aletheia_lora_config([3, 0], r=4, lora_alpha=8, attention_r=2)
    assert config.layers_to_transform == [0, 3]
    assert config.task_type == "CAUSAL_LM"
    model = tiny_model("llama", 4)
    lora = _lora_layers(_peft(model, config))
    assert sorted({_layer_of(n) for n in lora}) == [0, 3]
    assert len(lora) == 14
    for name, module in lora.items():
        assert module.r["default"] == (2 if _is_attention(name) else 4)
        assert module.scaling["default"] == pytest.approx(2.0)


def test_config_without_model_explicit_alpha():
    config = aletheia_lora_config([1], r=8, lora_alpha=16, mlp_r=4, mlp_alpha=1)
    lora = _lora_layers(_peft(tiny_model("llama", 2), config))
    for name, module in lora.items():
        if _is_attention(name):
            assert (module.r["default"], module.scaling["default"]) == (8, pytest.approx(2.0))
        else:
            assert (module.r["default"], module.scaling["default"]) == (4, pytest.approx(0.25))


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("selected", [[4], [0, 5], [-1]])
def test_selected_layer_out_of_range(selected):
    with pytest.raises(ValueError) as err:
        apply_aletheia_lora(tiny_model("llama", 4), selected)
    bad = [i for i in selected if not 0 <= i < 4]
    assert str(bad[0]) in str(err.value)


def test_selected_layers_duplicated_or_empty():
    model = tiny_model("llama", 4)
    with pytest.raises(ValueError, match="duplicate"):
        apply_aletheia_lora(model, [1, 2, 1])
    with pytest.raises(ValueError, match="empty"):
        apply_aletheia_lora(model, [])
    with pytest.raises(ValueError, match="duplicate"):
        aletheia_lora_config([0, 0])
    with pytest.raises(ValueError, match="empty"):
        aletheia_lora_config([])


@pytest.mark.parametrize("selected", [[1.0], ["1"], [True], [0, None]])
def test_selected_layers_must_be_ints(selected):
    with pytest.raises((TypeError, ValueError)):
        apply_aletheia_lora(tiny_model("llama", 4), selected)
    with pytest.raises((TypeError, ValueError)):
        aletheia_lora_config(selected)


def test_target_modules_matching_nothing_lists_available_names():
    model = tiny_model("gpt2", 2)
    with pytest.raises(ValueError) as err:
        apply_aletheia_lora(model, [0], target_modules=["q_proj"])
    message = str(err.value)
    assert "q_proj" in message
    for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
        assert name in message


@pytest.mark.parametrize(
    "kwargs", [{"r": 0}, {"attention_r": 0}, {"mlp_r": 0}, {"mlp_r": -4}, {"attention_r": 2.5}, {"r": -1}]
)
def test_bad_ranks(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        apply_aletheia_lora(tiny_model("llama", 2), [0], **kwargs)
    with pytest.raises(ValueError, match=name):
        aletheia_lora_config([0], **kwargs)
