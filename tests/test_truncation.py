"""Truncated backward: no block below the lowest adapted layer takes part in the backward pass."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model, token_rows
from peft import get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments

from aletheia_lora import apply_aletheia_lora
from aletheia_lora.batches import collate
from aletheia_lora.data import DataCollator
from aletheia_lora.truncation import TruncatedBackwardCallback, truncate_backward

SELECTED = [2, 4]  # lowest adapted layer: 2 of 6


def _count_backward(model) -> tuple[dict[int, int], list]:
    """Per block: how many times a gradient flowed through its output."""
    counts: dict[int, int] = {}
    handles = []
    for i, block in enumerate(model.base_model.model.model.layers):

        def forward_hook(module, args, output, i=i):
            out = output[0] if isinstance(output, tuple) else output
            if out.requires_grad:
                out.register_hook(lambda g, i=i: counts.__setitem__(i, counts.get(i, 0) + 1))

        handles.append(block.register_forward_hook(forward_hook))
    return counts, handles


def _peft(model, *, checkpointing: bool, reentrant: bool = False):
    """LoRA on SELECTED, set up the way common trainers do (inputs forced to require grad)."""
    torch.manual_seed(0)  # same LoRA initialisation for every copy
    peft_model = get_peft_model(model, apply_aletheia_lora(model, SELECTED, r=4))
    if checkpointing:
        peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    peft_model.enable_input_require_grads()
    peft_model.train()
    return peft_model


def _lora_grads(peft_model) -> dict[str, torch.Tensor]:
    batch = collate(token_rows(2))
    peft_model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_blocks_below_the_lowest_adapted_layer_get_no_backward(checkpointing):
    base = tiny_model("llama", num_layers=6)
    reference = _peft(copy.deepcopy(base), checkpointing=checkpointing, reentrant=True)
    counts_ref, _ = _count_backward(reference)
    expected = _lora_grads(reference)
    assert set(counts_ref) == set(range(6)), "without truncation the backward pass reaches block 0"

    model = _peft(base, checkpointing=checkpointing, reentrant=True)
    assert truncate_backward(model) == 2
    counts, _ = _count_backward(model)
    got = _lora_grads(model)
    assert set(counts) == {2, 3, 4, 5}, f"backward reached blocks {sorted(counts)}"
    assert expected.keys() == got.keys()
    for name in expected:  # training results unchanged
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7)
    layers = model.base_model.model.model.layers
    if checkpointing:
        assert [bool(b.gradient_checkpointing) for b in layers] == [False, False, True, True, True, True]


def test_truncation_is_idempotent_and_follows_a_new_lowest_layer():
    model = _peft(tiny_model("llama", num_layers=6), checkpointing=False)
    assert truncate_backward(model) == 2
    assert truncate_backward(model) == 2
    layers = model.base_model.model.model.layers
    assert [hasattr(b, "_aletheia_no_grad_hooks") for b in layers] == [True, True, False, False, False, False]
    for p in layers[2].parameters():
        p.requires_grad_(False)
    assert truncate_backward(model) == 4
    assert [hasattr(b, "_aletheia_no_grad_hooks") for b in layers] == [True] * 4 + [False] * 2


def test_trainable_embeddings_disable_truncation():
    model = _peft(tiny_model("llama", num_layers=6), checkpointing=False)
    model.get_input_embeddings().weight.requires_grad_(True)
    assert truncate_backward(model) is None


def test_grad_mode_is_restored_when_a_block_raises():
    model = _peft(tiny_model("llama", num_layers=6), checkpointing=False)
    truncate_backward(model)
    block = model.base_model.model.model.layers[1]  # runs under no_grad

    def boom(module, args):
        raise RuntimeError("boom")

    block.self_attn.register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        model(**collate(token_rows(1)))
    assert torch.is_grad_enabled()


def test_trainer_with_checkpointing_stays_truncated(tmp_path):
    base = tiny_model("llama", num_layers=6)
    model = get_peft_model(base, apply_aletheia_lora(base, SELECTED, r=4))
    truncate_backward(model)
    counts, _ = _count_backward(model)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": True},  # the callback makes it non-reentrant
        report_to="none",
        save_strategy="no",
        remove_unused_columns=False,
        use_cpu=True,
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    Trainer(
        model=model,
        args=args,
        train_dataset=token_rows(4),
        data_collator=DataCollator(0),
        callbacks=[TruncatedBackwardCallback()],
    ).train()
    assert set(counts) == {2, 3, 4, 5}
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert len(changed) == len(before), "every LoRA weight must have trained"


def test_restore_backward_removes_the_guards():
    from aletheia_lora.truncation import restore_backward

    model = _peft(tiny_model("llama", num_layers=6), checkpointing=False)
    truncate_backward(model)
    restore_backward(model)
    layers = model.base_model.model.model.layers
    assert not any(hasattr(b, "_aletheia_no_grad_hooks") for b in layers)
    assert all(not b._forward_pre_hooks for b in layers)
    model.enable_input_require_grads()  # truncate_backward removed it; a trainer may add it back
    counts, _ = _count_backward(model)
    _lora_grads(model)
    assert set(counts) == set(range(6)), "with the guards gone, forced input grads reach block 0 again"


def test_non_finite_gradient_stops_before_the_weights_change(tmp_path):
    from aletheia_lora.callbacks import NonFiniteGuard

    base = tiny_model("llama", num_layers=6)
    model = get_peft_model(base, apply_aletheia_lora(base, SELECTED, r=4))
    poisoned = model.base_model.model.model.layers[5].mlp.down_proj
    calls = {"n": 0}

    def poison_on_second_step(module, args, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] == 2 else output

    poisoned.register_forward_hook(poison_on_second_step)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=2,
        report_to="none",
        save_strategy="steps",
        save_steps=1,
        remove_unused_columns=False,
        use_cpu=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=token_rows(6),
        data_collator=DataCollator(0),
        callbacks=[NonFiniteGuard()],
    )
    with pytest.raises(FloatingPointError, match="step 2"):
        trainer.train()
    assert all(torch.isfinite(p).all() for p in model.parameters()), "no NaN may reach the weights"
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1"]


def test_non_finite_gradient_step_is_skipped_when_asked(tmp_path):
    from aletheia_lora.callbacks import NonFiniteGuard

    base = tiny_model("llama", num_layers=6)
    model = get_peft_model(base, apply_aletheia_lora(base, SELECTED, r=4))
    calls = {"n": 0}
    snapshots = []

    def poison_on_second_step(module, args, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] == 2 else output

    model.base_model.model.model.layers[5].mlp.down_proj.register_forward_hook(poison_on_second_step)
    lora = [p for p in model.parameters() if p.requires_grad]

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            snapshots.append([p.detach().clone() for p in lora])

    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=2,
        report_to="none",
        save_strategy="no",
        remove_unused_columns=False,
        use_cpu=True,
    )
    guard = NonFiniteGuard(skip=True)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=token_rows(6),
        data_collator=DataCollator(0),
        callbacks=[guard, Snapshot()],
    )
    with pytest.warns(UserWarning, match="step 2: non-finite gradient"):
        trainer.train()
    assert guard.skipped == [2]
    assert trainer.state.global_step == 3
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(snapshots[0], snapshots[1])), (
        "the skipped step changed weights"
    )
    assert not all(torch.equal(a, b) for a, b in zip(snapshots[1], snapshots[2])), "step 3 must train again"
