"""prepare_model / AletheiaConfig / AletheiaPlan, and training the result with transformers.Trainer
and trl.SFTTrainer end to end (tiny random-init Llama, a few steps on the CPU)."""

from __future__ import annotations

import math
import re

import datasets
import pytest
import torch
from conftest import tiny_model, token_rows, word_tokenizer
from peft import get_peft_model

from aletheia_lora import AletheiaConfig, AletheiaPlan, apply_aletheia_lora, prepare_model, select_layers
from aletheia_lora.data import DataCollator, tokenize_dataset

TEXTS = [
    "the cat sat on the mat",
    "a big dog ran to the red mat",
    "one small blue cat was big",
    "the dog and the cat sat on a mat",
    "two red dogs ran to one blue cat",
    "the small cat is on the big mat",
]
_LAYER = re.compile(r"\.layers\.(\d+)\.")


def _trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _lora_layers(model: torch.nn.Module) -> set[int]:
    """Indices of the decoder layers holding LoRA weights."""
    return {int(_LAYER.search(n).group(1)) for n, _ in model.named_parameters() if "lora_" in n}


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _changed(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}


# --------------------------------------------------------------------------- prepare_model


@pytest.mark.parametrize("top_pct, top_k", [(50, None), (25, None), (100, None), (50, 1)])
def test_prepare_model_plan_matches_selection_and_parameter_counts(top_pct, top_k):
    model = tiny_model("llama", num_layers=6)
    config = AletheiaConfig(probe_batches=3, mlp_r=8)
    peft_model, plan = prepare_model(model, token_rows(8), config, top_pct=top_pct, top_k=top_k)

    assert plan.config.top_pct == top_pct and plan.config.top_k == top_k  # overrides applied
    assert config.top_pct == 50 and config.top_k is None  # the caller's config is not modified
    assert plan.num_layers == 6 and sorted(plan.scores) == list(range(6))
    assert plan.selected_layers == select_layers(plan.scores, top_pct, top_k=top_k)
    assert len(plan.selected_layers) == (top_k or max(1, math.floor(6 * top_pct / 100)))
    assert plan.probe_seconds > 0
    assert _lora_layers(peft_model) == set(plan.selected_layers)

    assert plan.trainable_params == _trainable(peft_model)
    assert all("lora_" in n for n, p in peft_model.named_parameters() if p.requires_grad)

    everything = tiny_model("llama", num_layers=6)
    all_config = apply_aletheia_lora(everything, list(range(6)), r=config.r, mlp_r=config.mlp_r)
    assert plan.all_layer_trainable_params == _trainable(get_peft_model(everything, all_config))
    assert plan.trainable_fraction == pytest.approx(plan.trainable_params / plan.all_layer_trainable_params)
    if top_pct == 100 and top_k is None:
        assert plan.trainable_params == plan.all_layer_trainable_params


def test_prepare_model_rejects_unknown_override():
    with pytest.raises(TypeError, match="top_percent"):
        prepare_model(tiny_model("llama", 2), token_rows(2), top_percent=50)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"top_pct": 0}, "top_pct"),
        ({"top_pct": 101}, "top_pct"),
        ({"r": 0}, "r"),
        ({"mlp_r": 0}, "mlp_r"),
        ({"probe_batches": 0}, "probe_batches"),
        ({"probe_params": "x"}, "probe_params"),
        ({"probe_method": "x"}, "probe_method"),
    ],
)
def test_aletheia_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        AletheiaConfig(**kwargs)


def test_plan_json_round_trip():
    _, plan = prepare_model(tiny_model("llama", 4), token_rows(6), AletheiaConfig(probe_batches=2, mlp_r=8))
    text = plan.to_json()
    again = AletheiaPlan.from_json(text)

    assert again.to_json() == text
    assert again.selected_layers == plan.selected_layers
    assert again.scores == plan.scores and again.scores.meta == plan.scores.meta
    assert again.config == plan.config
    assert again.lora_config.to_dict() == plan.lora_config.to_dict()
    assert again.lora_config.layers_to_transform == plan.selected_layers
    assert again.lora_config.rank_pattern and set(again.lora_config.rank_pattern.values()) == {8}
    assert (again.trainable_params, again.all_layer_trainable_params, again.num_layers) == (
        plan.trainable_params,
        plan.all_layer_trainable_params,
        plan.num_layers,
    )


# --------------------------------------------------------------------------- transformers.Trainer


def test_transformers_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    model, tokenizer = tiny_model("llama"), word_tokenizer()
    train_rows = tokenize_dataset([{"text": t} for t in TEXTS], tokenizer)

    # --- the README snippet -----------------------------------------------------------
    peft_model, plan = prepare_model(model, train_rows, AletheiaConfig(top_pct=50))
    args = TrainingArguments(output_dir=tmp_path, max_steps=3, per_device_train_batch_size=2, report_to="none",
                             save_strategy="no", remove_unused_columns=False, use_cpu=True)  # fmt: skip
    trainer = Trainer(model=peft_model, args=args, train_dataset=train_rows,
                      data_collator=DataCollator(tokenizer.pad_token_id))  # fmt: skip
    before = _snapshot(peft_model)  # (test only, not in the README)
    result = trainer.train()
    # ----------------------------------------------------------------------------------

    assert trainer.state.global_step == 3
    assert math.isfinite(result.training_loss) and result.training_loss > 0
    changed = _changed(peft_model, before)
    lora = {n for n in before if "lora_" in n}
    assert changed and changed <= lora  # only LoRA weights move
    assert changed == lora  # after 3 steps every A and B has moved (B first, then A)
    assert _lora_layers(peft_model) == set(plan.selected_layers)
    assert len(plan.selected_layers) == 2


# --------------------------------------------------------------------------- trl.SFTTrainer


def test_trl_sft_trainer(tmp_path):
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(0)
    model, tokenizer = tiny_model("llama"), word_tokenizer()
    dataset = datasets.Dataset.from_list([{"text": t} for t in TEXTS])

    # --- the README snippet -----------------------------------------------------------
    peft_model, plan = prepare_model(model, dataset, AletheiaConfig(top_pct=50), tokenizer=tokenizer)
    args = SFTConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, max_length=32,
                     report_to="none", save_strategy="no", use_cpu=True)  # fmt: skip
    trainer = SFTTrainer(model=peft_model, args=args, train_dataset=dataset, processing_class=tokenizer)
    before = _snapshot(peft_model)  # (test only, not in the README)
    trainer.train()
    # ----------------------------------------------------------------------------------

    assert trainer.model is peft_model  # SFTTrainer kept our adapter instead of adding its own
    assert trainer.state.global_step == 3
    losses = [h["train_loss"] for h in trainer.state.log_history if "train_loss" in h]
    assert losses and all(math.isfinite(x) for x in losses)
    changed = _changed(peft_model, before)
    assert changed and all("lora_" in n for n in changed)
    assert _lora_layers(peft_model) == set(plan.selected_layers)
    assert {int(_LAYER.search(n).group(1)) for n in changed} == set(plan.selected_layers)


# --------------------------------------------------------------------------- held-out evaluation


def test_exact_match_prompts_the_model_as_training_did():
    """The held-out exact match (reported before/after training) must feed the model the same
    prompt ids that tokenize_dataset trained on: with a tokenizer that adds BOS, BOS included."""
    from tokenizers import processors

    from aletheia_lora.evaluation import exact_match

    tokenizer = word_tokenizer()
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single="[BOS] $A", special_tokens=[("[BOS]", tokenizer.bos_token_id)]
    )
    assert tokenizer("the cat")["input_ids"][0] == tokenizer.bos_token_id
    row = {"question": "the big cat sat on 3 mats", "answer": "the 3\n#### 3"}
    (train,) = tokenize_dataset([row], tokenizer, format="question_answer")
    prompt = [t for t, label in zip(train["input_ids"], train["labels"]) if label == -100]

    model = tiny_model("llama")
    seen: list[list[int]] = []
    model.get_input_embeddings().register_forward_pre_hook(lambda _, args: seen.append(args[0][0].tolist()))
    exact_match(model, tokenizer, [row], max_new_tokens=1)
    assert seen[0] == prompt


def test_plan_predicts_the_speedup_of_its_selection():
    from aletheia_lora import predict_speedup
    from aletheia_lora.plan import planned_cost

    _, last = prepare_model(
        tiny_model("llama", num_layers=6), token_rows(4), probe_batches=2, strategy="last", mlp_rank_factor=1
    )
    assert last.predicted_speedup == pytest.approx(
        predict_speedup(tiny_model("llama", num_layers=6), [3, 4, 5])  # uniform r=16, as predict_speedup
    )
    assert last.predicted_speedup > 1.0
    _, asym = prepare_model(
        tiny_model("llama", num_layers=6), token_rows(4), probe_batches=2, strategy="last"
    )
    assert asym.config.effective_mlp_r == 64  # the default: MLP rank 4 x r
    assert asym.predicted_speedup == pytest.approx(
        planned_cost(tiny_model("llama", num_layers=6), asym.config).speedup([3, 4, 5])
    )
    _, everything = prepare_model(
        tiny_model("llama", num_layers=6), token_rows(4), probe_batches=2, top_pct=100
    )
    assert everything.predicted_speedup == pytest.approx(1.0)


def test_calibrate_cost_fits_the_cost_model_on_this_machine_and_leaves_the_model_as_it_was():
    from aletheia_lora.costmodel import calibrate
    from aletheia_lora.plan import machine_cost, planned_cost

    model = tiny_model("llama", num_layers=6)
    before = _snapshot(model)
    flags = [p.requires_grad for p in model.parameters()]
    config = AletheiaConfig(strategy="depth-aware", probe_batches=2, calibrate_cost=True, calibrate_batch_size=2,
                            calibrate_seq_len=16)  # fmt: skip
    fitted = machine_cost(model, config)
    cal = fitted.meta["calibration"]
    assert fitted.unit == "s" and [len(p["layers"]) for p in cal["points"]] == [3, 1, 1]  # 6 blocks: 1/2, 1/4
    assert all(p["measured_s"] > 0 for p in cal["points"]) and math.isfinite(cal["max_relative_error"])
    assert fitted.meta["batch_size"] == 2 and fitted.meta["seq_len"] == 16
    # timed at the plan's ranks (MLP 64): the same measurements refit the uncounted model the same way
    refit = calibrate(planned_cost(model, config), [(p["layers"], p["measured_s"]) for p in cal["points"]])
    assert refit.meta["calibration"]["scale"] != cal["scale"]  # planned_cost counts 4 x 1024, not 2 x 16
    assert not _changed(model, before) and [p.requires_grad for p in model.parameters()] == flags
    assert not any("lora_" in n for n, _ in model.named_parameters())

    peft_model, plan = prepare_model(model, token_rows(4), config)
    assert plan.calibration is not None and len(plan.calibration["points"]) == 3
    assert plan.predicted_speedup != pytest.approx(planned_cost(model, config).speedup(plan.selected_layers))
    assert AletheiaPlan.from_json(plan.to_json()).calibration == plan.calibration
    assert _lora_layers(peft_model) == set(plan.selected_layers)


def test_default_ranks_are_asymmetric_and_old_plans_stay_uniform():
    model = tiny_model("llama", num_layers=4)
    peft_model, plan = prepare_model(model, token_rows(4), probe_batches=2)
    ranks = {
        n.split(".")[-1]: m.r["default"]
        for n, m in peft_model.named_modules()
        if hasattr(m, "r") and n.endswith("proj")
    }
    assert ranks["q_proj"] == 16 and ranks["down_proj"] == 64
    assert plan.lora_config.rank_pattern and plan.config.mlp_rank_factor == 4
    old = plan.to_dict()
    del old["config"]["mlp_rank_factor"]  # a plan written before the field existed
    assert AletheiaPlan.from_dict(old).config.effective_mlp_r == 16
    with pytest.raises(ValueError, match="mlp_rank_factor=0"):
        AletheiaConfig(mlp_rank_factor=0)


def test_train_reports_progress_inside_its_held_out_evaluation(tmp_path):
    """``train``'s before/after evaluation logs items done / total (here unthrottled), silent without a log."""
    from conftest import qa_rows, write_jsonl

    from aletheia_lora.data import prepare_data
    from aletheia_lora.settings import DataSettings
    from aletheia_lora.train import _metrics

    write_jsonl(tmp_path / "train.jsonl", qa_rows(12, seed=0))
    write_jsonl(tmp_path / "test.jsonl", qa_rows(5, seed=1))
    tokenizer, model = word_tokenizer(), tiny_model("llama").eval()
    data = prepare_data(DataSettings(data=str(tmp_path), max_length=32), tokenizer, seed=0)
    lines: list[str] = []
    logged = _metrics(model, tokenizer, data, 2, lines.append, progress_every=0)
    counts = [tuple(map(int, re.search(r"held-out: (\d+)/(\d+) items", line).groups())) for line in lines]
    assert counts and counts[-1][0] == counts[-1][1] == 5 + 2  # 5 rows scored, then 2 answers generated
    assert [done for done, _ in counts] == sorted({done for done, _ in counts})
    assert (
        _metrics(model, tokenizer, data, 2) == logged
    )  # and without a log: nothing to say, the same numbers
