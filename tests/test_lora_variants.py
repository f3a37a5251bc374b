"""--use_dora, --use_rslora, --init_lora_weights: validated with the other LoRA settings, passed to the LoraConfig
the plan trains, and really in the PEFT model built from it (read off its LoRA layers, not off the config)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model, token_rows
from peft.tuners.lora import LoraLayer

from aletheia_lora.card import model_card
from aletheia_lora.cli import main
from aletheia_lora.plan import plan_for, run_probe, wrap_with_plan
from aletheia_lora.scores import LayerScores
from aletheia_lora.settings import AletheiaConfig

SELECTED = [1, 3]
SCORES = LayerScores({i: float(i) for i in range(4)})


def _wrapped(family: str = "llama", **config):
    """(peft_model, plan) of LoRA on SELECTED of a tiny random-init model, attention r=2, MLP r=8."""
    return wrap_with_plan(tiny_model(family), SCORES, SELECTED, AletheiaConfig(r=2, lora_alpha=4, **config))


def _lora_layers(peft_model) -> dict[str, LoraLayer]:
    return {n: m for n, m in peft_model.named_modules() if isinstance(m, LoraLayer) and "default" in m.lora_A}


def _trainable(peft_model) -> int:
    return sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_use_dora_gives_every_adapted_module_a_magnitude_vector(family):
    peft_model, plan = _wrapped(family, use_dora=True)
    layers = _lora_layers(peft_model)
    assert layers and plan.lora_config.use_dora is True
    for name, module in layers.items():
        magnitude = module.lora_magnitude_vector["default"].weight
        out_features = module.get_base_layer().weight.shape[1 if family == "gpt2" else 0]
        assert magnitude.numel() == out_features > 0, name
        assert magnitude.requires_grad and module.use_dora["default"]
    # the plan's parameter count includes the magnitudes, as PEFT trains them
    assert plan.trainable_params == _trainable(peft_model)
    plain, plain_plan = _wrapped(family)
    assert not any(m.lora_magnitude_vector for m in _lora_layers(plain).values())
    assert plain_plan.trainable_params == _trainable(plain) < plan.trainable_params


def test_use_rslora_scales_each_update_by_alpha_over_sqrt_rank():
    peft_model, plan = _wrapped(use_rslora=True)
    layers = _lora_layers(peft_model)
    ranks = {m.r["default"] for m in layers.values()}
    assert ranks == {2, 8}  # attention r=2, MLP 4 x 2: alpha follows the rank (4 and 16)
    for name, module in layers.items():
        r = module.r["default"]
        alpha = 4 * r / 2
        assert module.scaling["default"] == pytest.approx(alpha / math.sqrt(r)), name
    plain = _lora_layers(_wrapped()[0])
    assert {m.scaling["default"] for m in plain.values()} == {2.0}  # alpha / r without rsLoRA


def test_gaussian_init_draws_a_from_a_normal_of_std_one_over_rank():
    peft_model, plan = _wrapped(init_lora_weights="gaussian", mlp_rank_factor=1)
    assert plan.lora_config.init_lora_weights == "gaussian"
    a = torch.cat([m.lora_A["default"].weight.flatten() for m in _lora_layers(peft_model).values()])
    assert a.std().item() == pytest.approx(1 / 2, rel=0.1)  # r = 2; Kaiming-uniform here would be 0.10
    default = torch.cat([m.lora_A["default"].weight.flatten() for m in _lora_layers(_wrapped(mlp_rank_factor=1)[0]).values()])  # fmt: skip
    assert default.std().item() < 0.2
    for module in _lora_layers(peft_model).values():  # B = 0: the adapter starts as a no-op
        assert not module.lora_B["default"].weight.any()


def test_init_false_starts_with_a_non_zero_update():
    peft_model, _ = _wrapped(init_lora_weights="false")
    assert all(m.lora_B["default"].weight.any() for m in _lora_layers(peft_model).values())


def test_the_probe_and_truncation_are_unchanged_by_the_variants():
    base, variant = (
        AletheiaConfig(probe_batches=2),
        AletheiaConfig(probe_batches=2, use_dora=True, use_rslora=True),
    )
    rows = token_rows(4)
    assert dict(run_probe(tiny_model(), rows, base)[0]) == dict(run_probe(tiny_model(), rows, variant)[0])
    peft_model, _ = _wrapped(use_dora=True)
    blocks = peft_model.base_model.model.model.layers
    assert hasattr(blocks[0], "_aletheia_no_grad_hooks") and not hasattr(blocks[1], "_aletheia_no_grad_hooks")


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("pissa", "rewrites the base weights"),
        ("pissa_niter_4", "rewrites the base weights"),
        ("olora", "rewrites the base weights"),
        ("loftq", "needs a loftq_config"),
        ("eva", "training data"),
        ("uniform", "not one of PEFT's initializations"),
    ],
)
def test_an_unsupported_init_is_refused_naming_it_and_the_choices(value, reason):
    with pytest.raises(ValueError, match=rf"init_lora_weights='{value}': .*{reason}.*use one of \['true', "):
        AletheiaConfig(init_lora_weights=value)


def test_orthogonal_init_needs_even_ranks():
    AletheiaConfig(init_lora_weights="orthogonal", r=2)
    with pytest.raises(
        ValueError, match=r"'orthogonal' needs even ranks; these are odd: \{'r': 3, 'attention_r': 3\}"
    ):
        AletheiaConfig(init_lora_weights="orthogonal", r=3, mlp_r=8)


def test_the_cli_refuses_a_bad_init_before_loading_anything(tmp_path, capsys):
    code = main(["probe", "--model", str(tmp_path / "absent"), "--init_lora_weights", "pissa"])
    assert code == 1
    assert "init_lora_weights='pissa'" in capsys.readouterr().err


def test_dora_on_moe_expert_tensors_is_refused_with_what_to_do():
    with pytest.raises(
        ValueError, match=r"use_dora=True: PEFT has no DoRA for MoE expert tensors .*target_modules"
    ):
        plan_for(tiny_model("mixtral"), SCORES, SELECTED, AletheiaConfig(use_dora=True))


def test_the_model_card_says_dora_rslora_and_the_init():
    _, plan = _wrapped(use_dora=True, use_rslora=True, init_lora_weights="gaussian")
    card = model_card({"plan": plan.to_dict()})
    assert "alpha / sqrt(rank) (rsLoRA)" in card and "DoRA (weight-decomposed LoRA)" in card
    assert "`init_lora_weights='gaussian'`" in card
    plain = model_card({"plan": _wrapped()[1].to_dict()})
    assert "DoRA" not in plain and "rsLoRA" not in plain and "init_lora_weights" not in plain
