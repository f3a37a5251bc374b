"""The contribution signal: an all-layer LoRA warm-up, each layer's first-order loss reduction."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model, token_rows
from peft import get_peft_model

from aletheia_lora import apply_aletheia_lora
from aletheia_lora.batches import probe_batches
from aletheia_lora.contribution import lora_warmup, warm_start
from aletheia_lora.lora_config import refuse_peft_model
from aletheia_lora.plan import AletheiaPlan, prepare_model, run_probe, select, wrap_with_plan
from aletheia_lora.probe import target_loss
from aletheia_lora.settings import AletheiaConfig


def _every_layer(model, **kw):
    return apply_aletheia_lora(model, list(range(4)), **({"r": 4, "lora_alpha": 8} | kw))


def test_the_layers_terms_add_up_to_the_loss_drop_of_a_small_step():
    model, rows = tiny_model(seed=1), token_rows(8, seed=3)
    config = _every_layer(model)
    warm = lora_warmup(model, rows, config, steps=1, lr=1e-4, seed=0)
    # the same step again, by hand: the adapters after it, the loss on the same batch
    batch = probe_batches(rows, 1, 1, seed=0)[0]
    fresh = tiny_model(seed=1)  # (it seeds torch itself)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        peft_model = get_peft_model(fresh, config)
    peft_model.eval()
    with torch.no_grad():
        before = target_loss(peft_model, batch).item()
        assert warm_start(peft_model, warm.adapter_state) == len(warm.adapter_state)
        after = target_loss(peft_model, batch).item()
    assert before == pytest.approx(warm.losses[0], abs=1e-6)
    predicted = math.fsum(warm.contribution.values())
    assert before - after > 0 and predicted == pytest.approx(before - after, rel=0.02)


def test_each_layer_gets_its_own_adapters_inner_product_of_gradient_and_update():
    model, rows = tiny_model(seed=2), token_rows(8, seed=4)
    config = _every_layer(model, attention_r=2, mlp_r=8)
    warm = lora_warmup(model, rows, config, steps=3, lr=1e-3, seed=5)
    # brute force: the same warm-up written out, gradient and update per parameter
    fresh = tiny_model(seed=2)  # (it seeds torch itself)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        peft_model = get_peft_model(fresh, config)
    peft_model.eval()
    named = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(named.values(), lr=1e-3, weight_decay=0.0)
    expected = [dict.fromkeys(range(4), 0.0) for _ in range(3)]
    for t, batch in enumerate(probe_batches(rows, 3, 1, seed=5)):
        optimizer.zero_grad()
        target_loss(peft_model, batch).backward()
        old = {n: (p.detach().clone(), p.grad.clone()) for n, p in named.items()}
        optimizer.step()
        for n, p in named.items():
            layer = int(n.split(".layers.")[1].split(".")[0])
            expected[t][layer] -= (old[n][1].double() * (p.detach() - old[n][0]).double()).sum().item()
    for t in range(3):
        assert warm.per_step[t] == pytest.approx(expected[t], rel=1e-6, abs=1e-12)
    assert warm.contribution == pytest.approx({k: sum(s[k] for s in expected) for k in range(4)}, rel=1e-6)
    assert all(v > 0 for v in warm.contribution.values())  # Adam's first steps go downhill


def test_the_model_comes_back_as_it_went_in():
    model, rows = tiny_model(seed=3), token_rows(6, seed=1)
    model.train()
    model.model.layers[1].mlp.gate_proj.weight.requires_grad_(False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    types = {n: type(m) for n, m in model.named_modules()}
    lora_warmup(model, rows, _every_layer(model), steps=2, lr=1e-2)
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags and model.training
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()) and set(state) == set(
        model.state_dict()
    )
    refuse_peft_model(model)  # no adapters left: PEFT may wrap it again


def test_score_contribution_selects_by_the_warm_up_and_the_kept_layers_continue_from_it():
    model, rows = tiny_model(seed=4), token_rows(8, seed=2)
    config = AletheiaConfig(
        score="contribution", probe_batches=3, top_k=2, r=4, lora_alpha=8, mlp_rank_factor=1
    )
    scores, seconds = run_probe(model, rows, config)
    assert scores.meta["score"] == "contribution" and set(scores.signals) == {"grad-norm", "contribution"}
    assert dict(scores) == scores.signals["contribution"] and scores.meta["warmup_steps"] == 3
    assert seconds >= scores.meta["warmup_seconds"] > 0
    selected = select(scores, config, model=model)
    assert selected == sorted(scores.ranking()[:2])
    peft_model, plan = wrap_with_plan(model, scores, selected, config)
    kept = {
        k: v for k, v in scores.warmup_state.items() if int(k.split(".layers.")[1].split(".")[0]) in selected
    }
    assert plan.warm_started == len(kept) > 0
    own = peft_model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in kept.items())
    assert not any(
        ".layers." + str(i) + "." in k and "lora_" in k for k in own for i in set(range(4)) - set(selected)
    )


def test_all_signals_include_the_warm_up_and_bad_settings_name_the_value():
    model, rows = tiny_model(seed=5), token_rows(6, seed=2)
    scores, _ = run_probe(model, rows, AletheiaConfig(probe_batches=2), signals="all")
    assert (
        scores.meta["score"] == "grad-norm" and "contribution" in scores.signals and len(scores.signals) == 5
    )
    with pytest.raises(ValueError, match="warmup_lr=0"):
        AletheiaConfig(score="contribution", warmup_lr=0)
    with pytest.raises(ValueError, match="steps=0"):
        lora_warmup(model, rows, _every_layer(model), steps=0)


def test_prepare_model_with_contribution_records_the_warm_start():
    model, rows = tiny_model(seed=6), token_rows(8, seed=5)
    peft_model, plan = prepare_model(
        model, rows, score="contribution", probe_batches=2, top_k=1, mlp_rank_factor=1
    )
    assert plan.warm_started == 14  # 7 adapted weights x (A, B) in the one kept layer
    assert AletheiaPlan.from_json(plan.to_json()).warm_started == 14
    assert plan.to_dict()["scores"]["meta"]["score"] == "contribution"
