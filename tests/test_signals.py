"""Probe signals (grad-norm, relative, lora-energy, coherence): each against plain autograd, in one pass.

The brute force below runs the model with real weight gradients (every parameter requires grad,
one backward per batch) and computes every signal from the explicit gradients: norms, the
weights' norms, ``torch.linalg.svdvals`` for the rank-r energy, and a running sum of the
gradients for coherence. The probe never forms a weight gradient of a Linear layer.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import expected_probed_names, tiny_model, token_rows
from safetensors.torch import load_file
from torch import nn

from aletheia_lora import LayerScores, find_blocks, gradient_probe, select_layers
from aletheia_lora.batches import probe_batches as make_probe_batches
from aletheia_lora.plan import AletheiaPlan, prepare_model, run_probe, select
from aletheia_lora.probe import SIGNALS, _gram, _lora_energy_sq
from aletheia_lora.settings import AletheiaConfig

RANKS = {"attention": 2, "mlp": 3}  # below every tensor's rank, so the truncation matters
REL = 1e-4

# --------------------------------------------------------------------------- brute force


def _probed(block: nn.Module, params: str) -> dict[str, nn.Parameter]:
    """The tensors the probe scores, decided from module types (conftest), not by the library."""
    named = dict(block.named_parameters())
    return {n: named[n] for n in expected_probed_names(block, params)}


def _rank(name: str, ranks: dict[str, int]) -> int:
    return ranks["attention"] if ("attn" in name or "attention" in name) else ranks["mlp"]


def _energy(grad: torch.Tensor, r: int) -> float:
    """Frobenius norm of the best rank-r approximation (per slice of a 3-D tensor), by SVD."""
    grad = grad.double()
    if grad.dim() < 2:
        return float(grad.norm())
    values = torch.linalg.svdvals(grad.reshape(-1, *grad.shape[-2:]))
    return float(values[:, :r].square().sum().sqrt())


def brute_force(model: nn.Module, batches: list[dict], params: str, ranks: dict[str, int]) -> dict:
    """signal -> layer -> value, from explicit weight gradients, one backward per batch."""
    model = copy.deepcopy(model).float().eval()
    for p in model.parameters():
        p.requires_grad_(True)
    blocks = find_blocks(model).blocks
    probed = [_probed(block, params) for block in blocks]
    norms = [{n: 0.0 for n in tensors} for tensors in probed]
    energy = [{n: 0.0 for n in tensors} for tensors in probed]
    sums: list[dict[str, torch.Tensor]] = [{} for _ in probed]
    for batch in batches:
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        target = batch["labels"][:, 1:]
        keep = target != -100
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        picked = logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        (-(picked * keep).sum() / keep.sum()).backward()
        for layer, tensors in enumerate(probed):
            for name, p in tensors.items():
                grad = torch.zeros_like(p) if p.grad is None else p.grad.detach()
                norms[layer][name] += float(grad.double().norm())
                energy[layer][name] += _energy(grad, _rank(name, ranks))
                sums[layer][name] = sums[layer].get(name, 0) + grad.double()
    out: dict[str, dict[int, float]] = {s: {} for s in SIGNALS}
    for layer, tensors in enumerate(probed):
        weight = {n: float(p.detach().double().norm()) for n, p in tensors.items()}
        out["grad-norm"][layer] = sum(norms[layer].values())
        out["relative"][layer] = sum(v / weight[n] for n, v in norms[layer].items() if weight[n] > 0)
        out["lora-energy"][layer] = sum(energy[layer].values())
        summed = sum(float(s.norm()) for s in sums[layer].values())
        out["coherence"][layer] = summed / out["grad-norm"][layer]
    return out


def assert_signals_close(scores: LayerScores, expected: dict, rel: float = REL) -> None:
    for signal, values in expected.items():
        for layer, value in values.items():
            got = scores.signals[signal][layer]
            assert math.isclose(got, value, rel_tol=rel, abs_tol=1e-9), (signal, layer, got, value)


def _batches(rows, probe_batches, batch_size):
    return make_probe_batches(rows, probe_batches, batch_size)


# --------------------------------------------------------------------------- each signal against brute force

SHORT = (4, 6, 5)  # few tokens: the token-space (Gram) route, batches kept for coherence
MIXED = (5, 12, 30)  # the weight route too, and coherence switching to a running sum mid-probe


@pytest.mark.parametrize("method", ["onepass", "chunked"])
@pytest.mark.parametrize("params", ["lora-targets", "all"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "mixtral", "qwen2_moe"])
def test_every_signal_matches_brute_force(family, params, method):
    model = tiny_model(family, 2, seed=5)
    rows = token_rows(3, seed=6, lengths=MIXED)
    scores = gradient_probe(
        model, rows, probe_batches=3, params=params, method=method, chunk_size=1, signals="all", ranks=RANKS
    )
    assert set(scores.signals) == set(SIGNALS)
    assert_signals_close(scores, brute_force(model, _batches(rows, 3, 1), params, RANKS))


@pytest.mark.parametrize("lengths", [SHORT, MIXED])
@pytest.mark.parametrize("batch_size", [1, 2])
def test_every_signal_matches_brute_force_across_token_counts(lengths, batch_size):
    model = tiny_model("llama", 3, seed=7)
    rows = token_rows(6, seed=8, lengths=lengths)
    scores = gradient_probe(model, rows, probe_batches=3, batch_size=batch_size, signals="all", ranks=RANKS)
    assert_signals_close(scores, brute_force(model, _batches(rows, 3, batch_size), "lora-targets", RANKS))


@pytest.mark.parametrize("signal", SIGNALS)
def test_the_score_is_the_chosen_signal_with_its_breakdown(signal):
    model = tiny_model("qwen2_moe", 2, seed=9)
    rows = token_rows(4, seed=10, lengths=MIXED)
    scores = gradient_probe(model, rows, probe_batches=2, signals="all", score=signal, ranks=RANKS)
    assert dict(scores) == scores.signals[signal]
    assert scores.meta["score"] == signal
    alone = gradient_probe(model, rows, probe_batches=2, score=signal, ranks=RANKS)
    assert set(alone.signals) == {"grad-norm", signal}
    for layer in scores:
        assert math.isclose(alone[layer], scores[layer], rel_tol=1e-12)
        if signal == "coherence":  # a ratio: each role's own coherence, between 0 and 1
            assert all(0 <= v <= 1 + 1e-9 for v in scores.roles[layer].values())
        else:  # summands: tensors and roles add up to the layer score
            assert math.isclose(sum(scores.modules[layer].values()), scores[layer], rel_tol=1e-9)
            assert math.isclose(sum(scores.roles[layer].values()), scores[layer], rel_tol=1e-9)


def test_per_tensor_breakdown_matches_brute_force():
    model = tiny_model("gpt2", 2, seed=11)
    rows = token_rows(2, seed=12, lengths=MIXED)
    scores = gradient_probe(model, rows, probe_batches=2, score="lora-energy", ranks=RANKS)
    model_copy = copy.deepcopy(model).eval()  # the probe runs without dropout
    for p in model_copy.parameters():
        p.requires_grad_(True)
    expected: dict[tuple[int, str], float] = {}
    for batch in _batches(rows, 2, 1):
        model_copy.zero_grad(set_to_none=True)
        logits = model_copy(input_ids=batch["input_ids"]).logits[:, :-1]
        nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch["input_ids"][:, 1:].reshape(-1)
        ).backward()
        for layer, block in enumerate(find_blocks(model_copy).blocks):
            for name, p in _probed(block, "lora-targets").items():
                key = (layer, name)
                expected[key] = expected.get(key, 0.0) + _energy(p.grad, _rank(name, RANKS))
    assert {(layer, name) for layer in scores.modules for name in scores.modules[layer]} == set(expected)
    for (layer, name), value in expected.items():
        assert math.isclose(scores.modules[layer][name], value, rel_tol=REL), (layer, name)


# --------------------------------------------------------------------------- lora-energy


def test_lora_energy_is_grad_norm_at_full_rank():
    model = tiny_model("mixtral", 2, seed=13)
    rows = token_rows(4, seed=14, lengths=MIXED)
    full = gradient_probe(model, rows, probe_batches=3, signals="lora-energy", ranks=10_000, params="all")
    assert full.signals["lora-energy"] == full.signals["grad-norm"]
    for r in (1, 2, 8):  # truncated: smaller, and growing with the rank
        low = gradient_probe(model, rows, probe_batches=3, signals="lora-energy", ranks=r)
        higher = gradient_probe(model, rows, probe_batches=3, signals="lora-energy", ranks=r + 1)
        for layer in low:
            assert low.signals["lora-energy"][layer] < low[layer]
            assert low.signals["lora-energy"][layer] <= higher.signals["lora-energy"][layer] * (1 + 1e-9)


@pytest.mark.parametrize(
    ("n", "d_in", "d_out"),
    [
        (5, 40, 24),  # token space, Gram matrices from grad-norm, QR of G^T
        (5, 24, 40),  # token space, QR of X^T
        (20, 40, 30),  # token space, grad-norm took the weight route: Gram matrices formed here
        (7, 3, 50),  # more tokens than d_in: the Gram matrix of G^T X
        (60, 16, 24),
        (30, 24, 16),
    ],
)
@pytest.mark.parametrize("reuse", [True, False])
def test_energy_routes_against_svd(n, d_in, d_out, reuse):
    # Without the shortcut the probe takes when r >= min(N, d_in, d_out): every route gives the
    # top-r energy of an explicit SVD, and the full norm at full rank.
    g = torch.Generator().manual_seed(n + d_in)
    x, grad = torch.randn(n, d_in, generator=g), torch.randn(n, d_out, generator=g)
    norm_sq, grams, m = _gram(x, grad)
    assert (grams is None) == (n * (d_in + d_out) >= d_in * d_out)
    formed = dict(grams=grams, m=m) if reuse else {}
    k = min(n, d_in, d_out)
    assert math.isclose(_lora_energy_sq(x, grad, k, **formed), norm_sq.item(), rel_tol=1e-5)
    values = torch.linalg.svdvals((grad.T @ x).double())
    for r in range(1, k + 1):
        expected = values[:r].square().sum().item()
        assert math.isclose(_lora_energy_sq(x, grad, r, **formed), expected, rel_tol=1e-5), r


def test_energy_of_a_tiny_rank_deficient_gradient_is_finite():
    # One probe batch of a tiny Llama (17 tokens, 32 wide, entries of G ~1e-4, one padding row): MKL's
    # fp32 eigensolver returned NaN on its token-space matrix on an Intel Xeon. Scaled first, it does not.
    tensors = load_file(Path(__file__).parent / "data" / "tiny_gradient_mkl_nan.safetensors")
    x, grad = tensors["x"], tensors["g"]
    expected = torch.linalg.svdvals((grad.T @ x).double())[:16].square().sum().item()
    assert math.isclose(_lora_energy_sq(x, grad, 16), expected, rel_tol=1e-4)
    assert _lora_energy_sq(x, torch.zeros_like(grad), 16) == 0.0


def test_ranks_by_role_and_as_a_callable():
    model = tiny_model("llama", 2, seed=15)
    rows = token_rows(3, seed=16, lengths=MIXED)
    by_dict = gradient_probe(
        model, rows, probe_batches=3, score="lora-energy", ranks={"attention": 2, "mlp": 3}
    )
    by_call = gradient_probe(
        model, rows, probe_batches=3, score="lora-energy", ranks=lambda role: 2 if role == "attention" else 3
    )
    assert by_dict.signals == by_call.signals
    assert by_dict.meta["ranks"]["attention"] == 2
    assert (
        by_dict.meta["ranks"]["mlp"]
        == by_dict.meta["ranks"]["expert"]
        == by_dict.meta["ranks"]["router"]
        == 3
    )
    default = gradient_probe(model, rows, probe_batches=3, score="lora-energy")
    assert set(default.meta["ranks"].values()) == {16}
    uniform = gradient_probe(model, rows, probe_batches=3, score="lora-energy", ranks=16)
    assert default.signals == uniform.signals


# --------------------------------------------------------------------------- coherence


def test_coherence_is_one_with_one_batch():
    model = tiny_model("qwen2_moe", 3, seed=17)
    scores = gradient_probe(model, token_rows(2, seed=18), probe_batches=1, params="all", score="coherence")
    assert set(scores.values()) == {1.0}
    assert all(v in (0.0, 1.0) for layer in scores.modules.values() for v in layer.values())  # 0: no gradient


def test_coherence_is_one_when_every_batch_is_the_same():
    model = tiny_model("llama", 2, seed=19)
    row = token_rows(1, seed=20, lengths=(30,))[0]  # long enough for the running-sum route
    scores = gradient_probe(model, [row, row, row], probe_batches=3, signals="all")
    for layer, value in scores.signals["coherence"].items():
        assert math.isclose(value, 1.0, rel_tol=1e-6), (layer, value)


def test_coherence_below_one_when_batches_disagree():
    model = tiny_model("llama", 3, seed=21)
    rows = token_rows(4, seed=22, lengths=SHORT)
    scores = gradient_probe(model, rows, probe_batches=4, signals="all")
    assert all(0 < v < 0.99 for v in scores.signals["coherence"].values())
    expected = brute_force(model, _batches(rows, 4, 1), "lora-targets", {"attention": 16, "mlp": 16})
    assert_signals_close(scores, {"coherence": expected["coherence"]})


def test_coherence_is_refused_on_several_ranks(monkeypatch):
    import aletheia_lora.probe as probe

    monkeypatch.setattr(probe, "_rank_and_world_size", lambda: (0, 2))
    with pytest.raises(ValueError, match="coherence"):
        gradient_probe(tiny_model("llama", 2), token_rows(4), probe_batches=2, signals="all")


# --------------------------------------------------------------------------- the default probe


def test_default_probe_is_grad_norm_alone_and_unchanged_by_other_signals():
    model = tiny_model("mixtral", 3, seed=23)
    rows = token_rows(6, seed=24, lengths=MIXED)
    default = gradient_probe(model, rows, num_layers=3, probe_batches=3)
    everything = gradient_probe(model, rows, num_layers=3, probe_batches=3, signals="all", ranks=RANKS)
    assert set(default.signals) == {"grad-norm"}
    assert default.meta["score"] == "grad-norm" and "ranks" not in default.meta
    assert (
        dict(default) == default.signals["grad-norm"] == everything.signals["grad-norm"] == dict(everything)
    )
    assert default.modules == everything.modules and default.roles == everything.roles
    expected = brute_force(model, _batches(rows, 3, 1), "lora-targets", RANKS)["grad-norm"]
    assert all(math.isclose(default[i], expected[i], rel_tol=1e-5) for i in expected)


def test_chunked_agrees_with_onepass_on_every_signal():
    model = tiny_model("gpt2", 3, seed=25)
    rows = token_rows(6, seed=26, lengths=MIXED)
    kw = dict(probe_batches=3, batch_size=2, signals="all", ranks=RANKS, params="all")
    one = gradient_probe(model, rows, **kw)
    chunked = gradient_probe(model, rows, method="chunked", chunk_size=2, **kw)
    assert_signals_close(one, chunked.signals)


# --------------------------------------------------------------------------- LayerScores


def test_json_round_trip_of_every_signal(tmp_path):
    scores = gradient_probe(
        tiny_model("qwen2_moe", 2, seed=27),
        token_rows(4, seed=28),
        probe_batches=2,
        signals="all",
        score="relative",
    )
    back = LayerScores.from_json(scores.to_json())
    assert back == scores
    assert back.signals == scores.signals
    assert all(type(k) is int for values in back.signals.values() for k in values)
    for signal, values in scores.signals.items():
        assert [back.signals[signal][i].hex() for i in values] == [v.hex() for v in values.values()]
    scores.to_json(tmp_path / "scores.json")
    assert LayerScores.from_json(tmp_path / "scores.json") == scores
    other = LayerScores.from_dict(scores.to_dict() | {"signals": {}})
    assert other != scores  # signals take part in equality


def test_json_written_before_signals_still_loads():
    scores = gradient_probe(tiny_model("llama", 2), token_rows(2), probe_batches=1)
    old = scores.to_dict()
    del old["signals"]
    old["meta"].pop("score")
    back = LayerScores.from_json(json.dumps(old))
    assert dict(back) == dict(scores) and back.modules == scores.modules
    assert back.signals == {}
    assert "signals" not in back.to_dict()
    assert select_layers(back, 50) == select_layers(scores, 50)


def test_with_score_rescores_the_same_probe():
    model = tiny_model("llama", 4, seed=29)
    rows = token_rows(4, seed=30, lengths=MIXED)
    scores = gradient_probe(model, rows, probe_batches=2, signals="all", ranks=RANKS)
    for signal in SIGNALS:
        other = scores.with_score(signal)
        assert dict(other) == scores.signals[signal] and other.meta["score"] == signal
        assert other.signals == scores.signals
        assert dict(
            gradient_probe(model, rows, probe_batches=2, signals="all", score=signal, ranks=RANKS)
        ) == dict(other)
    assert scores.with_score("grad-norm").modules == scores.modules
    assert scores.with_score("relative").modules == {}
    with pytest.raises(ValueError, match="coherence"):
        gradient_probe(model, rows, probe_batches=2).with_score("coherence")


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"signals": ["grad-norm", "bogus"]}, "bogus"),
        ({"signals": "everything"}, "everything"),
        ({"score": "bogus"}, "bogus"),
        ({"score": "gradnorm"}, "gradnorm"),
        ({"signals": "lora-energy", "ranks": 0}, "rank"),
        ({"signals": "lora-energy", "ranks": {"attn": 8}}, "attn"),
        ({"signals": "lora-energy", "ranks": {"mlp": 2.5}}, "2.5"),
        ({"signals": "lora-energy", "ranks": lambda role: -1}, "-1"),
    ],
)
def test_bad_signal_arguments(kwargs, word):
    model = tiny_model("llama", 2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=word):
        gradient_probe(model, token_rows(2), probe_batches=1, **kwargs)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())  # as built
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


# --------------------------------------------------------------------------- settings and the plan


def test_score_setting_is_validated():
    assert AletheiaConfig().score == "grad-norm"
    with pytest.raises(ValueError, match="bogus"):
        AletheiaConfig(score="bogus")
    with pytest.raises(ValueError, match="probe_batches"):
        AletheiaConfig(score="coherence", probe_batches=1)
    assert AletheiaConfig(score="coherence", probe_batches=2).score == "coherence"


def test_run_probe_scores_by_the_configured_signal_at_the_planned_ranks():
    model = tiny_model("llama", 4, seed=31)
    rows = token_rows(6, seed=32, lengths=MIXED)
    config = AletheiaConfig(score="lora-energy", probe_batches=3, r=2, mlp_r=3)
    assert config.probe_ranks == RANKS
    scores, _ = run_probe(model, rows, config)
    direct = gradient_probe(model, rows, probe_batches=3, score="lora-energy", ranks=RANKS)
    assert dict(scores) == dict(direct) == scores.signals["lora-energy"]
    assert scores.meta["ranks"]["attention"] == 2 and scores.meta["ranks"]["mlp"] == 3
    assert select(scores, config) == select_layers(scores.signals["lora-energy"], config.top_pct)
    plain, _ = run_probe(model, rows, AletheiaConfig(probe_batches=3))
    assert set(plain.signals) == {"grad-norm"}


def test_plans_written_without_the_score_field_still_load():
    model = tiny_model("llama", 2, seed=33)
    _, plan = prepare_model(model, token_rows(4), AletheiaConfig(probe_batches=2, score="relative"))
    data = json.loads(plan.to_json())
    assert data["config"]["score"] == "relative"
    assert AletheiaPlan.from_dict(data).config.score == "relative"
    del data["config"]["score"]
    del data["scores"]["signals"]
    old = AletheiaPlan.from_dict(data)
    assert old.config.score == "grad-norm"
    assert old.scores.signals == {}


def test_signals_under_bf16_autocast_are_close_to_fp32():
    model = tiny_model("llama", 2, seed=35)
    rows = token_rows(4, seed=36, lengths=MIXED)
    kw = dict(probe_batches=3, signals="all", ranks=RANKS)
    low = gradient_probe(model, rows, dtype=torch.bfloat16, **kw)
    full = gradient_probe(model, rows, **kw)
    assert low.meta["dtype"] == "bfloat16"
    for signal in SIGNALS:
        for layer, value in full.signals[signal].items():
            assert math.isclose(low.signals[signal][layer], value, rel_tol=0.1), (signal, layer)
