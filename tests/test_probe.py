"""gradient_probe: the scores, the two methods, the loss mask, dtypes, datasets, and model restoration."""

from __future__ import annotations

import copy
import math
import warnings

import datasets
import pytest
import torch
from conftest import expected_probed_names, tiny_model, token_rows, word_tokenizer
from torch import nn

from aletheia_lora import LayerScores, find_blocks, gradient_probe, select_layers
from aletheia_lora.batches import probe_batches as make_probe_batches

AGREEMENT_FAMILIES = ["llama", "gpt2", "gpt_neox", "phi3", "mixtral", "qwen2_moe", "opt"]


# --------------------------------------------------------------------------- helpers


def _rel_close(a: float, b: float, rel: float) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)


def assert_scores_close(a: LayerScores, b: LayerScores, rel: float, *, modules: bool = True) -> None:
    assert sorted(a) == sorted(b)
    for layer in a:
        assert _rel_close(a[layer], b[layer], rel), (layer, a[layer], b[layer])
        if modules:
            assert sorted(a.modules[layer]) == sorted(b.modules[layer])
            scale = a[layer]
            for name, value in a.modules[layer].items():
                other = b.modules[layer][name]
                assert math.isclose(value, other, rel_tol=rel, abs_tol=1e-7 * scale), (
                    layer,
                    name,
                    value,
                    other,
                )


def _pad(rows: list[dict], pad_id: int = 0) -> dict[str, torch.Tensor]:
    width = max(len(r["input_ids"]) for r in rows)
    ids, mask, labels = [], [], []
    for r in rows:
        n = len(r["input_ids"])
        m = list(r.get("attention_mask") or [1] * n)
        lab = list(r.get("labels") or r["input_ids"])
        lab = [x if keep else -100 for x, keep in zip(lab, m)]
        ids.append(list(r["input_ids"]) + [pad_id] * (width - n))
        mask.append(m + [0] * (width - n))
        labels.append(lab + [-100] * (width - n))
    return {
        "input_ids": torch.tensor(ids),
        "attention_mask": torch.tensor(mask),
        "labels": torch.tensor(labels),
    }


def brute_force(model: nn.Module, batches: list[list[dict]], params: str) -> tuple[dict[int, float], dict]:
    """Plain autograd: every parameter requires grad, loss = mean shifted CE over labels != -100."""
    model = copy.deepcopy(model).float().eval()
    for p in model.parameters():
        p.requires_grad_(True)
    blocks = find_blocks(model).blocks
    names = [expected_probed_names(block, params) for block in blocks]
    totals = {layer: 0.0 for layer in range(len(blocks))}
    per_name: dict[int, dict[str, float]] = {layer: dict.fromkeys(names[layer], 0.0) for layer in totals}
    for rows in batches:
        model.zero_grad(set_to_none=True)
        batch = _pad(rows)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        target = batch["labels"][:, 1:]
        keep = target != -100
        picked = logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        loss = -(picked * keep).sum() / keep.sum()
        loss.backward()
        for layer, block in enumerate(blocks):
            params_by_name = dict(block.named_parameters())
            for name in names[layer]:
                grad = params_by_name[name].grad
                value = 0.0 if grad is None else float(torch.linalg.vector_norm(grad.double()))
                totals[layer] += value
                per_name[layer][name] += value
    return totals, per_name


HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)


def snapshot(model: nn.Module) -> dict:
    return {
        "params": {
            name: (
                p.requires_grad,
                p.dtype,
                p.device,
                p.detach().clone(),
                p.grad,
                None if p.grad is None else p.grad.detach().clone(),
                dict(p._post_accumulate_grad_hooks or {}),
                dict(p._backward_hooks or {}),
            )
            for name, p in model.named_parameters()
        },
        "modes": {name: m.training for name, m in model.named_modules()},
        "hooks": {
            name: {attr: dict(getattr(m, attr, None) or {}) for attr in HOOK_DICTS}
            for name, m in model.named_modules()
        },
        "buffers": {name: b.detach().clone() for name, b in model.named_buffers()},
    }


def assert_restored(model: nn.Module, snap: dict) -> None:
    params = dict(model.named_parameters())
    assert sorted(params) == sorted(snap["params"])
    for name, p in params.items():
        requires_grad, dtype, device, data, grad_obj, grad_val, post_hooks, bw_hooks = snap["params"][name]
        assert p.requires_grad == requires_grad, name
        assert p.dtype == dtype, name
        assert p.device == device, name
        assert torch.equal(p.detach(), data), name  # bitwise (no NaN in these models)
        assert p.grad is grad_obj, name
        if grad_val is not None:
            assert torch.equal(p.grad, grad_val), name
        assert dict(p._post_accumulate_grad_hooks or {}) == post_hooks, name
        assert dict(p._backward_hooks or {}) == bw_hooks, name
    assert {name: m.training for name, m in model.named_modules()} == snap["modes"]
    for name, m in model.named_modules():
        for attr in HOOK_DICTS:
            assert dict(getattr(m, attr, None) or {}) == snap["hooks"][name][attr], (name, attr)
    for name, b in model.named_buffers():
        assert torch.equal(b, snap["buffers"][name]), name


# --------------------------------------------------------------------------- onepass == chunked


@pytest.mark.parametrize("params", ["lora-targets", "all"])
@pytest.mark.parametrize("family", AGREEMENT_FAMILIES)
def test_onepass_matches_chunked(family, params):
    model = tiny_model(family, 3, seed=1)
    rows = token_rows(4, seed=3)
    kw = dict(probe_batches=2, batch_size=2, params=params)
    one = gradient_probe(model, rows, method="onepass", **kw)
    chunked = gradient_probe(model, rows, method="chunked", chunk_size=2, **kw)  # 2 does not divide 3
    assert_scores_close(one, chunked, 1e-4)
    for layer in one:
        assert one.roles[layer].keys() == chunked.roles[layer].keys()
        for role, value in one.roles[layer].items():
            assert math.isclose(value, chunked.roles[layer][role], rel_tol=1e-4, abs_tol=1e-7 * one[layer])
    assert one.meta["method"] == "onepass" and chunked.meta["method"] == "chunked"
    assert one.meta["tokens"] == chunked.meta["tokens"]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_onepass_matches_chunked_short_and_long_batches(family, batch_size):
    # batch_size=1 keeps token counts below the layer widths, batch_size=3 above: both Gram routes run.
    model = tiny_model(family, 4, seed=2)
    rows = token_rows(6, seed=4, lengths=(4, 30, 7, 25, 3, 12))
    one = gradient_probe(model, rows, probe_batches=2, batch_size=batch_size)
    for chunk_size in (3, 8):  # 3 does not divide 4; 8 covers all blocks in one pass
        chunked = gradient_probe(
            model, rows, probe_batches=2, batch_size=batch_size, method="chunked", chunk_size=chunk_size
        )
        assert_scores_close(one, chunked, 1e-4)


# --------------------------------------------------------------------------- brute force


@pytest.mark.parametrize("method", ["onepass", "chunked"])
@pytest.mark.parametrize("params", ["lora-targets", "all"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "mixtral", "qwen2_moe"])
def test_matches_brute_force(family, params, method):
    model = tiny_model(family, 2, seed=5)
    rows = token_rows(2, seed=6, lengths=(9, 15))
    # one batch of two rows of different lengths: padding and a per-batch mean over real tokens
    scores = gradient_probe(
        model, rows, probe_batches=1, batch_size=2, params=params, method=method, chunk_size=1
    )
    expected, per_name = brute_force(model, [rows], params)
    for layer in expected:
        assert _rel_close(scores[layer], expected[layer], 1e-5), (layer, scores[layer], expected[layer])
        assert set(scores.modules[layer]) == set(per_name[layer])
        for name, value in per_name[layer].items():
            assert math.isclose(
                scores.modules[layer][name], value, rel_tol=1e-4, abs_tol=1e-7 * expected[layer]
            )
    assert scores.meta["tokens"] == 8 + 14


def test_scores_add_over_batches():
    model = tiny_model("llama", 3, seed=7)
    rows = token_rows(3, seed=8)
    together = gradient_probe(model, rows, probe_batches=3)
    parts = [gradient_probe(model, [row], probe_batches=1) for row in rows]
    for layer in together:
        assert _rel_close(together[layer], sum(p[layer] for p in parts), 1e-6)
    expected, _ = brute_force(model, [[r] for r in rows], "lora-targets")
    for layer in together:
        assert _rel_close(together[layer], expected[layer], 1e-5)
    assert together.meta["tokens"] == sum(len(r["input_ids"]) - 1 for r in rows)
    assert together.meta["batches"] == 3


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2_moe"])
def test_all_params_at_least_lora_targets(family):
    model = tiny_model(family, 3)
    rows = token_rows(4)
    targets = gradient_probe(model, rows, probe_batches=2)
    everything = gradient_probe(model, rows, probe_batches=2, params="all")
    for layer in targets:
        assert everything[layer] > targets[layer]  # norms (and biases) have non-zero gradients
        for name, value in targets.modules[layer].items():
            assert math.isclose(everything.modules[layer][name], value, rel_tol=1e-6, abs_tol=1e-12)
        extra = set(everything.modules[layer]) - set(targets.modules[layer])
        assert any("norm" in n or "ln" in n for n in extra)
        assert everything.roles[layer]["other"] > 0


# --------------------------------------------------------------------------- the loss mask


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("method", ["onepass", "chunked"])
def test_padding_does_not_change_scores(family, method):
    model = tiny_model(family, 2, seed=9)
    row = token_rows(1, seed=10, lengths=(11,))[0]
    n = len(row["input_ids"])
    padded = {"input_ids": row["input_ids"] + [5, 6, 7, 8], "attention_mask": [1] * n + [0] * 4}
    # labels on padding positions must be ignored too
    padded_with_labels = dict(padded, labels=padded["input_ids"])
    plain = gradient_probe(model, [row], probe_batches=1, method=method)
    for other in (padded, padded_with_labels):
        scores = gradient_probe(model, [other], probe_batches=1, method=method)
        assert_scores_close(plain, scores, 1e-5)
        assert scores.meta["tokens"] == plain.meta["tokens"] == n - 1


def test_padding_inside_a_batch_matches_separate_rows():
    # Two rows of the same length padded to a longer width keep the same per-batch mean.
    model = tiny_model("llama", 2, seed=11)
    a, b = token_rows(2, seed=12, lengths=(8,))
    pad = {"input_ids": b["input_ids"] + [9] * 6, "attention_mask": [1] * 8 + [0] * 6}
    unpadded = gradient_probe(model, [a, b], probe_batches=1, batch_size=2)
    padded = gradient_probe(model, [a, pad], probe_batches=1, batch_size=2)
    assert_scores_close(unpadded, padded, 1e-5)


@pytest.mark.parametrize("method", ["onepass", "chunked"])
def test_label_mask_restricts_the_loss(method):
    model = tiny_model("llama", 3, seed=13)
    row = token_rows(1, seed=14, lengths=(14,))[0]
    masked = {"input_ids": row["input_ids"], "labels": [-100] * 6 + row["input_ids"][6:]}
    plain = gradient_probe(model, [row], probe_batches=1, method=method)
    restricted = gradient_probe(model, [masked], probe_batches=1, method=method)
    assert restricted.meta["tokens"] == 14 - 6
    assert plain.meta["tokens"] == 13
    assert all(not _rel_close(plain[i], restricted[i], 1e-3) for i in plain)
    expected, _ = brute_force(model, [[masked]], "lora-targets")
    for layer in expected:
        assert _rel_close(restricted[layer], expected[layer], 1e-5)


def test_first_label_is_never_a_target():
    # Only position 0 carries a label: nothing is predicted, so there is nothing to probe.
    model = tiny_model("llama", 2)
    row = {"input_ids": [5, 6, 7, 8], "labels": [5, -100, -100, -100]}
    with pytest.raises(ValueError):
        gradient_probe(model, [row], probe_batches=1)


# --------------------------------------------------------------------------- non-finite values


@pytest.mark.parametrize("method", ["onepass", "chunked"])
@pytest.mark.parametrize("bad", [math.inf, math.nan])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_non_finite_weight_raises_and_restores(method, bad, dtype):
    model = tiny_model("llama", 2).to(dtype)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = bad
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)
    snap_modes = {n: m.training for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(FloatingPointError) as err:
        gradient_probe(model, token_rows(2), probe_batches=2, method=method)
    message = str(err.value)
    assert "batch" in message or "layer" in message
    assert "dtype=torch.float32" in message or "torch.bfloat16" in message
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {n: m.training for n, m in model.named_modules()} == snap_modes
    assert all(p.grad is None for p in model.parameters())
    assert all(p.dtype == dtype for p in model.parameters())


@pytest.mark.parametrize("method", ["onepass", "chunked"])
def test_overflowing_gradient_names_the_layer(method):
    # Finite loss, but the gradient of layer 1's o_proj overflows fp32.
    model = tiny_model("llama", 2)
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.weight.mul_(1e36)
        model.model.layers[1].self_attn.o_proj.weight.mul_(1e-36)
    snap = snapshot(model)
    with pytest.raises(FloatingPointError, match="layer 1") as err:
        gradient_probe(model, token_rows(2), probe_batches=1, method=method)
    assert "o_proj" in str(err.value)
    assert "float32" in str(err.value)
    assert_restored(model, snap)


# --------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("family", ["llama", "gpt2", "mixtral"])
def test_fp16_model_probed_in_fp32_and_restored_bitwise(family):
    model = tiny_model(family, 2, seed=15).half()
    for i, p in enumerate(model.parameters()):
        p.requires_grad_(i % 2 == 0)
        if i % 3 == 0:
            p.grad = torch.full_like(p, 0.5)
    snap = snapshot(model)
    scores = gradient_probe(model, token_rows(4), probe_batches=2)
    assert all(math.isfinite(v) and v > 0 for v in scores.values())
    assert_restored(model, snap)
    assert all(p.dtype == torch.float16 for p in model.parameters())
    reference = gradient_probe(copy.deepcopy(model).float(), token_rows(4), probe_batches=2)
    assert_scores_close(scores, reference, 1e-6)


@pytest.mark.parametrize(
    ("model_dtype", "dtype", "expected"),
    [
        (torch.float16, None, "float32"),  # fp16 models are probed in fp32 by default
        (torch.float32, torch.float64, "float64"),  # upcast on request
        (torch.float32, torch.bfloat16, "bfloat16"),  # autocast on request
        (torch.float32, None, "float32"),
    ],
)
def test_meta_reports_compute_dtype(model_dtype, dtype, expected):
    model = tiny_model("llama", 2).to(model_dtype)
    scores = gradient_probe(model, token_rows(2), probe_batches=1, dtype=dtype)
    assert scores.meta["dtype"] == expected
    assert all(p.dtype == model_dtype for p in model.parameters())


def test_bf16_model_upcast_on_request_and_restored():
    model = tiny_model("llama", 2, seed=16).to(torch.bfloat16)
    snap = snapshot(model)
    scores = gradient_probe(model, token_rows(4), probe_batches=2, dtype=torch.float32)
    assert_restored(model, snap)
    reference = gradient_probe(copy.deepcopy(model).float(), token_rows(4), probe_batches=2)
    assert_scores_close(scores, reference, 1e-6)


def test_bf16_autocast_on_fp32_model():
    model = tiny_model("llama", 2, seed=17)
    snap = snapshot(model)
    low = gradient_probe(model, token_rows(4), probe_batches=2, dtype=torch.bfloat16)
    assert_restored(model, snap)
    full = gradient_probe(model, token_rows(4), probe_batches=2)
    assert low.meta["dtype"] == "bfloat16"
    for layer in full:
        assert math.isfinite(low[layer])
        assert _rel_close(low[layer], full[layer], 0.1)


# --------------------------------------------------------------------------- model restoration


@pytest.mark.parametrize("method", ["onepass", "chunked"])
@pytest.mark.parametrize("params", ["lora-targets", "all"])
@pytest.mark.parametrize("family", ["gpt2", "mixtral"])
def test_model_state_restored(family, params, method):
    model = tiny_model(family, 3, seed=18)
    named = list(model.named_parameters())
    # mixed requires_grad pattern, some pre-existing gradients
    for i, (_, p) in enumerate(named):
        p.requires_grad_(i % 3 != 0)
        if i % 4 == 1:
            p.grad = torch.full_like(p, 0.25 + i)
    # mixed train / eval modes
    model.eval()
    blocks = find_blocks(model).blocks
    blocks[1].train()
    # a user hook that must survive and keep firing
    calls = []
    user_hook = blocks[0].register_forward_hook(lambda m, a, o: calls.append(1))
    snap = snapshot(model)
    scores = gradient_probe(model, token_rows(4), probe_batches=2, params=params, method=method, chunk_size=2)
    assert all(math.isfinite(v) for v in scores.values())
    assert len(calls) > 0
    assert_restored(model, snap)
    user_hook.remove()
    n_calls = len(calls)
    model(input_ids=torch.tensor([[3, 4, 5]]))
    assert len(calls) == n_calls  # removing the user hook worked: it was still the registered one


def test_model_in_train_mode_stays_in_train_mode():
    model = tiny_model("gpt2", 2)
    model.train()
    snap = snapshot(model)
    gradient_probe(model, token_rows(2), probe_batches=1)
    assert_restored(model, snap)
    assert model.training and all(m.training for m in model.modules())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_gradient_checkpointing_model(family):
    model = tiny_model(family, 3, seed=31)
    rows = token_rows(4)
    reference = gradient_probe(model, rows, probe_batches=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.gradient_checkpointing_enable()
    model.train()
    snap = snapshot(model)
    flags = {
        n: m.gradient_checkpointing for n, m in model.named_modules() if hasattr(m, "gradient_checkpointing")
    }
    assert any(flags.values())
    for method in ("onepass", "chunked"):
        scores = gradient_probe(model, rows, probe_batches=2, method=method)
        assert_scores_close(scores, reference, 1e-5)
    assert_restored(model, snap)
    assert {
        n: m.gradient_checkpointing for n, m in model.named_modules() if hasattr(m, "gradient_checkpointing")
    } == flags


def test_no_grads_and_identical_outputs_after_probe():
    model = tiny_model("llama", 2).eval()
    ids = torch.tensor([token_rows(1)[0]["input_ids"]])
    with torch.no_grad():
        before = model(input_ids=ids).logits.clone()
    gradient_probe(model, token_rows(3), probe_batches=3)
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)


# --------------------------------------------------------------------------- eval mode, seeds


def test_eval_mode_by_default():
    model = tiny_model("gpt2", 2, seed=19)  # GPT-2 configs have 10% dropout
    assert model.config.resid_pdrop > 0
    rows = token_rows(4)
    model.train()
    first = gradient_probe(model, rows, probe_batches=2)
    second = gradient_probe(model, rows, probe_batches=2)
    model.eval()
    in_eval = gradient_probe(model, rows, probe_batches=2)
    assert dict(first) == dict(second) == dict(in_eval)
    assert first.modules == in_eval.modules


def test_train_mode_is_seeded_and_uses_dropout():
    model = tiny_model("gpt2", 2, seed=19)
    rows = token_rows(4)
    rng = torch.get_rng_state()
    a = gradient_probe(model, rows, probe_batches=2, train_mode=True)
    b = gradient_probe(model, rows, probe_batches=2, train_mode=True)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG stream is untouched
    assert dict(a) == dict(b)
    assert a.modules == b.modules
    eval_scores = gradient_probe(model, rows, probe_batches=2)
    assert all(not _rel_close(a[i], eval_scores[i], 1e-4) for i in a)  # dropout really was on
    chunked = gradient_probe(model, rows, probe_batches=2, train_mode=True, method="chunked", chunk_size=1)
    assert_scores_close(a, chunked, 1e-4)  # same dropout masks in both methods
    assert a.meta["train_mode"] is True


def test_same_seed_identical_different_seed_different_rows():
    model = tiny_model("llama", 4, seed=20)
    rows = token_rows(8, seed=21)
    s1 = gradient_probe(model, rows, probe_batches=2, seed=1)
    s1_again = gradient_probe(model, rows, probe_batches=2, seed=1)
    assert dict(s1) == dict(s1_again)
    assert s1.modules == s1_again.modules
    assert s1.roles == s1_again.roles
    assert select_layers(s1) == select_layers(s1_again)
    s0 = gradient_probe(model, rows, probe_batches=2, seed=0)
    rows0 = make_probe_batches(rows, 2, seed=0)
    rows1 = make_probe_batches(rows, 2, seed=1)
    assert any(not torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(rows0, rows1, strict=True))
    assert dict(s0) != dict(s1)
    assert s0.meta["seed"] == 0 and s1.meta["seed"] == 1


# --------------------------------------------------------------------------- datasets


class _TorchRows(torch.utils.data.Dataset):
    def __init__(self, rows, bare=False):
        self.rows, self.bare = rows, bare

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        ids = torch.tensor(self.rows[i]["input_ids"])
        return ids if self.bare else {"input_ids": ids}


def test_dataset_kinds_agree():
    model = tiny_model("llama", 2, seed=22)
    rows = token_rows(6, seed=23)
    kw = dict(probe_batches=3, batch_size=2)
    reference = gradient_probe(model, rows, **kw)
    hf = datasets.Dataset.from_list(rows)
    for data in (hf, hf.with_format("torch"), _TorchRows(rows), _TorchRows(rows, bare=True)):
        scores = gradient_probe(model, data, **kw)
        assert dict(scores) == dict(reference), type(data)
        assert scores.meta["tokens"] == reference.meta["tokens"]


def test_explicit_attention_mask_and_labels_columns():
    model = tiny_model("llama", 2, seed=22)
    rows = token_rows(4, seed=23)
    full = [dict(r, attention_mask=[1] * len(r["input_ids"]), labels=list(r["input_ids"])) for r in rows]
    assert dict(gradient_probe(model, full, probe_batches=4)) == dict(
        gradient_probe(model, rows, probe_batches=4)
    )


def test_dataloader_batches_used_as_they_come():
    model = tiny_model("llama", 2, seed=24)
    rows = token_rows(4, seed=25, lengths=(9,))
    loader = torch.utils.data.DataLoader(_TorchRows(rows), batch_size=1, shuffle=False)
    from_loader = gradient_probe(model, loader, probe_batches=4)
    from_list = gradient_probe(model, rows, probe_batches=4)
    assert_scores_close(from_loader, from_list, 1e-9)
    assert from_loader.meta["batches"] == 4
    # batches of two rows: the loss is the mean over both rows of each batch
    pairs = torch.utils.data.DataLoader(_TorchRows(rows), batch_size=2, shuffle=False)
    scores = gradient_probe(model, pairs, probe_batches=2)
    expected, _ = brute_force(model, [rows[:2], rows[2:]], "lora-targets")
    for layer in expected:
        assert _rel_close(scores[layer], expected[layer], 1e-5)
    # fewer batches requested than the loader has: only the first ones
    first = gradient_probe(model, pairs, probe_batches=1)
    assert first.meta["batches"] == 1
    only_first, _ = brute_force(model, [rows[:2]], "lora-targets")
    assert all(_rel_close(first[i], only_first[i], 1e-5) for i in first)
    with pytest.warns(UserWarning):
        short = gradient_probe(model, pairs, probe_batches=5)
    assert short.meta["batches"] == 2


def test_dataloader_with_labels_and_mask():
    model = tiny_model("llama", 2, seed=24)
    rows = token_rows(2, seed=25, lengths=(9,))
    labels = [[-100] * 4 + r["input_ids"][4:] for r in rows]
    batch = [
        {"input_ids": torch.tensor(r["input_ids"]), "labels": torch.tensor(lab)}
        for r, lab in zip(rows, labels)
    ]
    loader = torch.utils.data.DataLoader(batch, batch_size=2)
    scores = gradient_probe(model, loader, probe_batches=1)
    expected, _ = brute_force(model, [[dict(r, labels=lab) for r, lab in zip(rows, labels)]], "lora-targets")
    assert all(_rel_close(scores[i], expected[i], 1e-5) for i in expected)
    assert scores.meta["tokens"] == 2 * 5


def test_strings_and_text_rows_with_tokenizer():
    tok = word_tokenizer()
    model = tiny_model("llama", 2, seed=26)
    texts = [
        "the cat sat on the mat",
        "a big dog ran to the red mat and sat",
        "one small blue cat",
        "two dogs",
    ]
    tokenized = [{"input_ids": tok(t)["input_ids"]} for t in texts]
    assert all(len(r["input_ids"]) >= 2 for r in tokenized)
    kw = dict(probe_batches=2, batch_size=2)
    reference = gradient_probe(model, tokenized, **kw)
    from_strings = gradient_probe(model, texts, tokenizer=tok, **kw)
    from_text_rows = gradient_probe(model, [{"text": t} for t in texts], tokenizer=tok, **kw)
    from_hf = gradient_probe(model, datasets.Dataset.from_dict({"text": texts}), tokenizer=tok, **kw)
    assert dict(from_strings) == dict(reference)
    assert dict(from_text_rows) == dict(reference)
    assert dict(from_hf) == dict(reference)
    assert from_strings.meta["tokens"] == sum(len(r["input_ids"]) - 1 for r in tokenized)


@pytest.mark.parametrize("data", [["the cat sat"], [{"text": "the cat sat"}]])
def test_text_without_tokenizer_is_an_error(data):
    with pytest.raises(ValueError, match="tokenizer"):
        gradient_probe(tiny_model("llama", 2), data, probe_batches=1)


def test_max_length_truncates_rows():
    model = tiny_model("llama", 2, seed=27)
    rows = token_rows(4, seed=28)
    truncated = [{"input_ids": r["input_ids"][:6]} for r in rows]
    a = gradient_probe(model, rows, probe_batches=4, max_length=6)
    b = gradient_probe(model, truncated, probe_batches=4)
    assert dict(a) == dict(b)
    assert a.meta["tokens"] == sum(len(r["input_ids"]) - 1 for r in truncated)


# --------------------------------------------------------------------------- bad input


def test_empty_dataset():
    model = tiny_model("llama", 2)
    for empty in ([], datasets.Dataset.from_list([])):
        with pytest.raises(ValueError, match="empty"):
            gradient_probe(model, empty)


def test_fewer_examples_than_probe_batches():
    model = tiny_model("llama", 2, seed=29)
    rows = token_rows(3, seed=30)
    with pytest.warns(UserWarning, match="fewer"):
        scores = gradient_probe(model, rows, probe_batches=5)
    assert scores.meta["batches"] == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exact = gradient_probe(model, rows, probe_batches=3)
    assert dict(scores) == dict(exact)
    assert scores.meta["tokens"] == exact.meta["tokens"]


def test_fewer_examples_than_batches_times_batch_size():
    model = tiny_model("llama", 2, seed=29)
    rows = token_rows(5, seed=30)
    with pytest.warns(UserWarning):
        scores = gradient_probe(model, rows, probe_batches=4, batch_size=2)
    assert scores.meta["batches"] == 3  # 2 + 2 + 1 rows


def test_num_layers_mismatch():
    model = tiny_model("llama", 4)
    with pytest.raises(ValueError) as err:
        gradient_probe(model, token_rows(2), num_layers=3)
    message = str(err.value)
    assert "3" in message and "4" in message
    assert "num_layers=None" in message
    scores = gradient_probe(model, token_rows(2), num_layers=4, probe_batches=1)
    assert sorted(scores) == [0, 1, 2, 3]
    explicit = gradient_probe(model, token_rows(2), probe_batches=1, layers_path="model.layers", device="cpu")
    assert dict(explicit) == dict(scores)


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"method": "fast"}, "method"),
        ({"method": "Chunked"}, "method"),
        ({"params": "weights"}, "params"),
        ({"params": "lora_targets"}, "params"),
        ({"probe_batches": 0}, "probe_batches"),
        ({"probe_batches": -2}, "probe_batches"),
        ({"method": "chunked", "chunk_size": 0}, "chunk_size"),
        ({"layers_path": "model.blocks"}, "layers_path"),
    ],
)
def test_bad_arguments(kwargs, word):
    model = tiny_model("llama", 2)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=word):
        gradient_probe(model, token_rows(2), **kwargs)
    assert_restored(model, snap)


@pytest.mark.parametrize(
    "rows",
    [
        [{"input_ids": [5, 6, 7, 8], "labels": [-100] * 4}, {"input_ids": [9, 10], "labels": [-100, -100]}],
        [{"input_ids": [5, 6, 7], "attention_mask": [0, 0, 0]}],
        [{"input_ids": [5]}, {"input_ids": [7]}],
    ],
)
def test_no_target_tokens(rows):
    model = tiny_model("llama", 2)
    snap = snapshot(model)
    with pytest.raises(ValueError):
        gradient_probe(model, rows, probe_batches=len(rows))
    assert_restored(model, snap)
