"""LayerScores: a dict[int, float] with modules / roles / meta, and an exact JSON round trip."""

from __future__ import annotations

import copy
import json
import math
import pickle

import pytest
from conftest import tiny_model, token_rows

from aletheia_lora import LayerScores, gradient_probe

ROLE_NAMES = {"attention", "mlp", "expert", "router", "other"}


@pytest.fixture(scope="module")
def probed():
    """A real probe result with awkward floats (many significant digits)."""
    return gradient_probe(
        tiny_model("mixtral", 3, seed=1), token_rows(6, seed=2), probe_batches=3, params="all"
    )


def test_is_a_dict_of_int_to_float(probed):
    assert isinstance(probed, dict)
    assert sorted(probed) == [0, 1, 2]
    assert all(type(k) is int and type(v) is float for k, v in probed.items())
    assert all(math.isfinite(v) and v > 0 for v in probed.values())


def test_meta_describes_the_run(probed):
    meta = probed.meta
    for key in ("batches", "tokens", "seconds", "method", "params", "seed"):
        assert key in meta
    assert meta["batches"] == 3
    assert meta["method"] == "onepass"
    assert meta["params"] == "all"
    assert meta["seed"] == 42
    assert isinstance(meta["tokens"], int) and meta["tokens"] > 0
    assert meta["seconds"] >= 0


def test_modules_sum_to_layer_score(probed):
    assert sorted(probed.modules) == [0, 1, 2]
    for layer, score in probed.items():
        assert all(type(k) is str for k in probed.modules[layer])
        assert math.isclose(sum(probed.modules[layer].values()), score, rel_tol=1e-12)


@pytest.mark.parametrize(
    ("family", "params", "expected_roles"),
    [
        ("llama", "lora-targets", {"attention", "mlp"}),
        ("llama", "all", {"attention", "mlp", "other"}),
        ("gpt2", "all", {"attention", "mlp", "other"}),
        ("mixtral", "lora-targets", {"attention", "expert", "router"}),
        ("qwen2_moe", "lora-targets", {"attention", "expert", "router"}),
    ],
)
def test_roles_subtotals_sum_to_layer_score(family, params, expected_roles):
    scores = gradient_probe(tiny_model(family, 2), token_rows(4), probe_batches=2, params=params)
    assert sorted(scores.roles) == sorted(scores)
    for layer, score in scores.items():
        roles = scores.roles[layer]
        assert set(roles) <= ROLE_NAMES
        assert set(roles) == expected_roles
        assert math.isclose(sum(roles.values()), score, rel_tol=1e-12)
        assert all(v >= 0 for v in roles.values())


def test_json_round_trip_is_exact(probed):
    text = probed.to_json()
    back = LayerScores.from_json(text)
    assert isinstance(back, LayerScores)
    assert back == probed
    assert dict(back) == dict(probed)
    assert back.modules == probed.modules
    assert back.roles == probed.roles
    assert back.meta == probed.meta
    assert all(type(k) is int for k in back)
    assert all(type(k) is int for k in back.modules)
    assert all(type(k) is int for k in back.roles)
    # bit-exact floats
    for layer in probed:
        assert back[layer].hex() == probed[layer].hex()


def test_json_round_trip_compact_and_valid_json(probed):
    text = probed.to_json(indent=None)
    assert "\n" not in text
    data = json.loads(text)
    assert set(data) >= {"scores", "modules", "roles", "meta"}
    assert LayerScores.from_json(text) == probed


def test_json_round_trip_via_str_path(probed, tmp_path):
    path = tmp_path / "sub" / "scores.json"
    returned = probed.to_json(str(path))
    assert path.exists()
    assert json.loads(path.read_text()) == json.loads(returned)
    back = LayerScores.from_json(str(path))
    assert back == probed
    assert all(type(k) is int for k in back.modules)


def test_json_round_trip_via_pathlib_path(probed, tmp_path):
    # to_json accepts a pathlib.Path; reading it back with the same Path must work too.
    path = tmp_path / "scores.json"
    probed.to_json(path)
    assert path.exists()
    back = LayerScores.from_json(path)
    assert back == probed


def test_from_json_rejects_foreign_json():
    with pytest.raises(ValueError, match="scores"):
        LayerScores.from_json('{"layers": {"0": 1.0}}')


def test_equality_includes_breakdown_and_meta():
    base = LayerScores(
        {0: 1.0, 1: 2.0}, modules={0: {"a": 1.0}, 1: {"a": 2.0}}, roles={0: {"mlp": 1.0}}, meta={"x": 1}
    )
    same = LayerScores(
        {0: 1.0, 1: 2.0}, modules={0: {"a": 1.0}, 1: {"a": 2.0}}, roles={0: {"mlp": 1.0}}, meta={"x": 1}
    )
    other_meta = LayerScores({0: 1.0, 1: 2.0}, modules=base.modules, roles=base.roles, meta={"x": 2})
    other_modules = LayerScores({0: 1.0, 1: 2.0}, modules={0: {"b": 1.0}}, roles=base.roles, meta=base.meta)
    other_roles = LayerScores(
        {0: 1.0, 1: 2.0}, modules=base.modules, roles={0: {"attention": 1.0}}, meta=base.meta
    )
    assert base == same
    assert not (base == other_meta)
    assert not (base == other_modules)
    assert not (base == other_roles)
    # Plain dicts compare by the scores only.
    assert base == {0: 1.0, 1: 2.0}


def test_not_equal_is_consistent_with_equal():
    a = LayerScores({0: 1.0}, meta={"seed": 1})
    b = LayerScores({0: 1.0}, meta={"seed": 2})
    assert (a == b) is False
    assert (a != b) is True
    assert (a != LayerScores({0: 1.0}, meta={"seed": 1})) is False


def test_keys_and_values_are_normalised():
    scores = LayerScores({"2": 3, 0: 1.5}, modules={"2": {"w": 3.0}}, roles={"0": {"mlp": 1.5}})
    assert dict(scores) == {2: 3.0, 0: 1.5}
    assert type(scores[2]) is float
    assert scores.modules == {2: {"w": 3.0}}
    assert scores.roles == {0: {"mlp": 1.5}}
    assert scores.meta == {}


def test_breakdown_is_not_shared_with_the_caller():
    modules = {0: {"w": 1.0}}
    meta = {"seed": 1}
    scores = LayerScores({0: 1.0}, modules=modules, meta=meta)
    modules[0]["w"] = 99.0
    meta["seed"] = 99
    assert scores.modules == {0: {"w": 1.0}}
    assert scores.meta == {"seed": 1}


def test_ranking_highest_first_ties_lower_index():
    scores = LayerScores({0: 1.0, 1: 3.0, 2: 3.0, 3: 2.0})
    assert scores.ranking() == [1, 2, 3, 0]


def test_copy_and_pickle_keep_everything(probed):
    for clone in (copy.deepcopy(probed), pickle.loads(pickle.dumps(probed))):
        assert isinstance(clone, LayerScores)
        assert clone == probed
        assert clone.modules == probed.modules
        assert clone.meta == probed.meta


def test_signals_are_normalised_compared_and_round_tripped():
    signals = {"grad-norm": {"1": 2, 0: 1.5}, "relative": {0: 0.25, 1: 0.5}}
    scores = LayerScores({0: 1.5, 1: 2.0}, meta={"score": "grad-norm"}, signals=signals)
    assert scores.signals == {"grad-norm": {0: 1.5, 1: 2.0}, "relative": {0: 0.25, 1: 0.5}}
    assert type(scores.signals["grad-norm"][1]) is float
    signals["relative"][0] = 99.0
    assert scores.signals["relative"][0] == 0.25  # not shared with the caller
    assert LayerScores.from_json(scores.to_json()) == scores
    assert scores != LayerScores({0: 1.5, 1: 2.0}, meta={"score": "grad-norm"})
    relative = scores.with_score("relative")
    assert dict(relative) == {0: 0.25, 1: 0.5} and relative.meta == {"score": "relative"}
    with pytest.raises(ValueError, match="lora-energy"):
        scores.with_score("lora-energy")
    assert "signals" not in LayerScores({0: 1.0}).to_dict()  # hand-made scores keep the old format
