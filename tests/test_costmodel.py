"""The step-cost model: FLOP counts from shapes, the speedup of a selection, calibration."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
import transformers as T
from conftest import FAMILIES, tiny_config, tiny_model
from torch import nn

from aletheia_lora import predict_speedup
from aletheia_lora.costmodel import (
    LORA_SLOWDOWN,
    CostModel,
    calibrate,
    cost_model,
    named_selection,
    uniform_cost_model,
)

# DESIGN.md: one H200, bf16, batch 4 x 1024, LoRA r=16 on q,k,v,o,gate,up,down; median step seconds.
LLAMA_8B_H200 = {
    "all": 0.455,
    "every_other": 0.370,
    "bottom_half": 0.369,
    "top_half": 0.297,
    "top_quarter": 0.218,
}
# Gradient checkpointing (truncated for the selection): all layers 640 ms, top half 387 ms.
LLAMA_8B_H200_GC = {"all": 0.640, "top_half": 0.387}


def llama_8b_on_meta():
    config = T.LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    )
    with torch.device("meta"):
        return T.AutoModelForCausalLM.from_config(config)


@pytest.fixture(scope="module")
def llama_8b_cost():
    return cost_model(llama_8b_on_meta())


class _OneLinearBlock(nn.Module):
    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.mlp = nn.Module()
        self.mlp.up_proj = nn.Linear(d_in, d_out, bias=False)


class _Stack(nn.Module):
    """A block stack at ``model.layers`` whose blocks hold one Linear each; no attention, no head."""

    def __init__(self, n: int, d_in: int, d_out: int) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(_OneLinearBlock(d_in, d_out) for _ in range(n))


def test_one_linear_is_exactly_two_tokens_in_out():
    cost = cost_model(_Stack(3, 8, 12), batch_size=2, seq_len=5, r=4, lora_slowdown=1)
    tokens = 2 * 5
    assert cost.forward == [2 * tokens * 8 * 12] * 3
    assert cost.backward == cost.forward  # input gradient of a matmul: the forward's FLOPs
    assert cost.lora == [3 * 2 * tokens * 4 * (8 + 12)] * 3
    assert cost.head == cost.head_backward == 0.0
    slow = cost_model(_Stack(3, 8, 12), batch_size=2, seq_len=5, r=4)
    assert slow.lora == [LORA_SLOWDOWN * v for v in cost.lora]
    assert slow.forward == cost.forward


def test_llama_block_is_matmuls_plus_causal_attention():
    model = tiny_model("llama", 2)
    batch, seq = 2, 16
    cost = cost_model(model, batch_size=batch, seq_len=seq, lora_slowdown=1)
    tokens = batch * seq
    block = model.model.layers[0]
    matmuls = sum(
        2 * tokens * m.in_features * m.out_features for m in block.modules() if isinstance(m, nn.Linear)
    )
    heads, head_dim = model.config.num_attention_heads, model.config.head_dim
    attention = 2 * 2 * batch * heads * seq**2 * head_dim / 2
    assert cost.forward[0] == pytest.approx(matmuls + attention, rel=1e-12)
    assert cost.backward[0] == pytest.approx(matmuls + 2 * attention, rel=1e-12)
    assert cost.head == 2 * tokens * model.config.hidden_size * model.config.vocab_size


def test_moe_counts_the_routed_experts_per_token():
    def expert_flops(k):
        config = tiny_config("mixtral", 2)
        config.num_experts_per_tok = k
        torch.manual_seed(0)
        model = T.AutoModelForCausalLM.from_config(config)
        return cost_model(model, batch_size=1, seq_len=8, lora_slowdown=1), model

    two, model = expert_flops(2)
    one, _ = expert_flops(1)
    experts = model.model.layers[0].mlp.experts
    per_token_one_expert = sum(p[0].numel() for p in (experts.gate_up_proj, experts.down_proj))
    tokens = 8
    # one more routed expert per token adds exactly 2 * tokens * (its weights) to forward and backward
    assert two.forward[0] - one.forward[0] == 2 * tokens * per_token_one_expert
    assert two.backward[0] - one.backward[0] == 2 * tokens * per_token_one_expert
    # 4 experts, 2 per token: half of what a dense count of every expert would give
    assert experts.gate_up_proj.shape[0] == 4
    assert two.meta["experts_per_token"] == 2


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family(family):
    model = tiny_model(family, 4)
    cost = cost_model(model, batch_size=2, seq_len=16)
    assert cost.num_layers == 4
    assert all(v > 0 for v in cost.forward + cost.backward + cost.lora)
    assert cost.head > 0
    assert cost.speedup(range(4)) == 1.0
    assert cost.speedup([2, 3]) > 1.0


@pytest.mark.parametrize("source", ["tiny", "llama-8b"])
def test_monotonic_facts(source, llama_8b_cost):
    cost = cost_model(tiny_model("llama", 8), batch_size=4, seq_len=64) if source == "tiny" else llama_8b_cost
    n = cost.num_layers
    top, bottom, every_other = (named_selection(s, n) for s in ("top_half", "bottom_half", "every_other"))
    assert cost.speedup(range(n)) == 1.0
    assert cost.step_cost(top) < cost.step_cost(bottom) < cost.step_cost(range(n))
    assert cost.step_cost(every_other) == pytest.approx(cost.step_cost(bottom), rel=0.02)
    assert cost.speedup(named_selection("top_quarter", n)) > cost.speedup(top) > 1.0
    # checkpointing re-runs the forward of every block at or above the lowest adapted one
    for layers in (top, bottom, [n - 1]):
        extra = cost.step_cost(layers, gradient_checkpointing=True) - cost.step_cost(layers)
        assert extra == pytest.approx(math.fsum(cost.forward[layers[0] :]), rel=1e-12)
    assert cost.speedup(top, gradient_checkpointing=True) > cost.speedup(top)


def test_uncalibrated_llama_8b_is_near_the_h200_table(llama_8b_cost):
    """FLOPs alone (lora_slowdown=60) land within 8% of every measured ratio."""
    for name, seconds in LLAMA_8B_H200.items():
        measured = LLAMA_8B_H200["all"] / seconds
        assert llama_8b_cost.speedup(named_selection(name, 32)) == pytest.approx(measured, rel=0.08)


def _independent(cost, names):
    rows = []
    for name in names:
        part = cost.breakdown(named_selection(name, cost.num_layers))
        rows.append([part["forward"], part["backward"], part["lora"]])
    return torch.linalg.matrix_rank(torch.tensor(rows, dtype=torch.float64)).item() == 3


@pytest.mark.parametrize("source", ["uniform", "llama-8b"])
def test_calibration_reproduces_the_h200_table_from_three_points(source, llama_8b_cost):
    cost = uniform_cost_model(32) if source == "uniform" else llama_8b_cost
    triples = [t for t in itertools.combinations(LLAMA_8B_H200, 3) if _independent(cost, t)]
    assert len(triples) >= 6  # every triple that mixes a change of lowest layer with a change of count
    for triple in triples:
        fitted = calibrate(cost, {name: LLAMA_8B_H200[name] for name in triple})
        assert fitted.unit == "s"
        for name, seconds in LLAMA_8B_H200.items():
            predicted = fitted.step_cost(named_selection(name, 32))
            assert predicted == pytest.approx(seconds, rel=0.10), (triple, name, predicted)


def test_calibrated_llama_8b_predicts_checkpointing(llama_8b_cost):
    fitted = calibrate(llama_8b_cost, {k: LLAMA_8B_H200[k] for k in ("all", "top_half", "every_other")})
    scale = fitted.meta["calibration"]["scale"]
    assert all(v > 0 for v in scale.values())
    assert fitted.meta["calibration"]["max_relative_error"] < 1e-6  # three points, three scales
    top = named_selection("top_half", 32)
    measured = LLAMA_8B_H200_GC["all"] / LLAMA_8B_H200_GC["top_half"]
    assert fitted.speedup(top, gradient_checkpointing=True) == pytest.approx(measured, rel=0.10)
    assert fitted.step_cost(top, gradient_checkpointing=True) == pytest.approx(
        LLAMA_8B_H200_GC["top_half"], rel=0.10
    )


def test_calibration_input_forms_agree():
    cost = uniform_cost_model(8, forward=2.0, backward=3.0, lora=1.0)
    by_name = calibrate(cost, {"all": 0.8, "top_half": 0.5, "every_other": 0.7, "top_half+gc": 0.6})
    by_list = calibrate(
        cost,
        [(range(8), 0.8), ([4, 5, 6, 7], 0.5), ([0, 2, 4, 6], 0.7, False), ([4, 5, 6, 7], 0.6, True)],
    )
    assert by_name.forward == pytest.approx(by_list.forward)
    assert by_name.lora == pytest.approx(by_list.lora)
    assert by_name.meta["calibration"]["points"][3]["gradient_checkpointing"] is True


def test_calibration_scales_are_never_negative():
    cost = uniform_cost_model(8)
    # times that fall as more layers are adapted: least squares would want a negative LoRA scale
    fitted = calibrate(cost, {"all": 0.30, "top_half": 0.40, "every_other": 0.50, "top_quarter": 0.2})
    assert all(v >= 0 for v in fitted.meta["calibration"]["scale"].values())


def test_too_few_independent_points_fit_one_scale_with_a_warning():
    cost = uniform_cost_model(32)
    with pytest.warns(UserWarning, match="common scale"):
        fitted = calibrate(cost, {"all": 0.455, "top_half": 0.297})
    scale = fitted.meta["calibration"]["scale"]
    assert scale["forward"] == scale["backward"] == scale["lora"] > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        calibrate(cost, {"all": 0.455, "top_half": 0.297, "every_other": 0.370})


def test_bad_inputs_say_what_to_do():
    cost = uniform_cost_model(4)
    with pytest.raises(ValueError, match="top_third"):
        calibrate(cost, {"top_third": 0.1})
    with pytest.raises(ValueError, match="positive"):
        calibrate(cost, {"all": 0.0})
    with pytest.raises(ValueError, match="out of range"):
        cost.step_cost([4])
    with pytest.raises(ValueError, match="empty"):
        cost.step_cost([])
    with pytest.raises(ValueError, match="one cost per layer"):
        CostModel(forward=[1.0], backward=[], lora=[1.0])
    with pytest.raises(ValueError, match="predict_speedup needs"):
        predict_speedup(None, [0])


def test_predict_speedup_on_a_tiny_llama(llama):
    assert predict_speedup(llama, range(4)) == 1.0
    assert predict_speedup(llama, [2, 3]) > 1.0
    assert predict_speedup(llama, [3]) > predict_speedup(llama, [2, 3])
    # the bottom layer drags the whole backward pass along, however few layers are adapted
    assert predict_speedup(llama, [0, 3]) < predict_speedup(llama, [2, 3])
    assert predict_speedup(llama, [2, 3], gradient_checkpointing=True) > predict_speedup(llama, [2, 3])
    given = uniform_cost_model(4)
    assert predict_speedup(None, [2, 3], cost=given) == given.speedup([2, 3]) == 1.5
