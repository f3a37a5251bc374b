"""Every adapter folder carries a model card (README.md) and names its real base model, so it can be
moved, shared and reloaded elsewhere; the card's loading snippet runs as printed."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import qa_rows, saved_workspace, tiny_model, token_rows, write_jsonl
from huggingface_hub import ModelCard
from peft import PeftModel
from transformers import AutoModelForCausalLM

from aletheia_lora import prepare_model
from aletheia_lora.card import ADAPTER_PLACEHOLDER, model_card, save_with_card
from aletheia_lora.cli import main
from aletheia_lora.models import EMBEDDED_GGUF, EMBEDDED_HUB_ID, base_model_reference

IDS = torch.tensor([[1, 4, 6, 8, 9, 4, 10, 3, 3, 19, 7]])


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    """(base model folder, finished `train` run folder) for a tiny 4-layer Llama, 3 steps."""
    root = tmp_path_factory.mktemp("card")
    saved_workspace(root, n_rows=24)
    out = root / "run"
    rc = main(["train", "--model", str(root / "model"), "--data", str(root / "data.jsonl"), "--output_dir", str(out),
               "--max_steps", "3", "--learning_rate", "1e-2", "--per_device_train_batch_size", "2", "--r", "2",
               "--max_length", "32", "--eval_generate", "2", "--max_eval_samples", "4", "--probe_batches", "2",
               "--save_steps", "50", "--disable_tqdm", "true", "--quiet", "true"])  # fmt: skip
    assert rc == 0
    return root / "model", out


def _snippet(card: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    assert len(blocks) == 1, "the card has one python snippet"
    return blocks[0]


def _logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_train_writes_a_model_card_with_the_hub_metadata_and_the_selection(run):
    model_dir, out = run
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "peft" and card.data.pipeline_tag == "text-generation"
    assert {"lora", "aletheia-lora"} <= set(card.data.tags)
    assert card.data.base_model is None  # a local folder is no Hub id ...
    assert f"the local folder `{model_dir.resolve()}`" in card.text  # ... and the card says so
    assert "[More Information Needed]" not in card.text  # not PEFT's blank template
    record = json.loads((out / "aletheia.json").read_text())
    assert record["base_model"] == {"name": str(model_dir.resolve()), "kind": "local"}
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(model_dir.resolve())

    layers = record["plan"]["selected_layers"]
    assert f"LoRA on {len(layers)} of 4 decoder layers: {', '.join(map(str, layers))}." in card.text
    assert "`grad-norm`" in card.text and "`top` strategy" in card.text and "top_pct 50" in card.text
    assert "![per-layer probe scores, selected layers marked](layer_scores.png)" in card.text
    assert "measured" in card.text and "s/step" in card.text
    # ranks and alphas per module kind: attention r=2 alpha 32, MLP 4 x 2 = 8 with alpha 4 x 32
    assert (
        "| `self_attn.k_proj`, `self_attn.o_proj`, `self_attn.q_proj`, `self_attn.v_proj` | 2 | 32 |"
        in card.text
    )
    assert "| `mlp.down_proj`, `mlp.gate_proj`, `mlp.up_proj` | 8 | 128 |" in card.text
    before, after = record["metrics_before"]["eval_loss"], record["metrics_after"]["eval_loss"]
    assert f"| eval_loss | {before:.4f} | {after:.4f} |" in card.text
    assert "| learning_rate | 0.01 |" in card.text and "| steps | 3 |" in card.text
    assert f"| peft | {record['versions']['peft']} |" in card.text


def test_the_cards_snippet_reloads_the_adapter_from_a_moved_copy(run, tmp_path, monkeypatch):
    model_dir, out = run
    moved = tmp_path / "elsewhere" / "my-adapter"
    shutil.copytree(out, moved, ignore=shutil.ignore_patterns("checkpoint-*"))
    card = (moved / "README.md").read_text()
    code = _snippet(card)
    assert f'adapter = "{ADAPTER_PLACEHOLDER}"' in code
    monkeypatch.chdir(tmp_path / "elsewhere")
    namespace: dict = {}
    exec(code.replace(ADAPTER_PLACEHOLDER, "my-adapter"), namespace)  # as a user pastes it, path filled in
    model = namespace["model"]
    assert isinstance(model, PeftModel) and namespace["tokenizer"] is not None
    adapted = {
        int(n.split(".layers.")[1].split(".")[0]) for n, _ in model.named_parameters() if "lora_A" in n
    }
    assert adapted == set(json.loads((moved / "aletheia.json").read_text())["plan"]["selected_layers"])
    base_logits = _logits(AutoModelForCausalLM.from_pretrained(model_dir))
    assert (_logits(model) - base_logits).abs().max() > 1e-4  # the trained adapter, not a blank one


def _record(base: dict, data: str | None = None) -> dict:
    model = tiny_model("llama")
    _, plan = prepare_model(model, token_rows(4), probe_batches=1, r=2)
    return {"plan": plan.to_dict(), "base_model": base, "settings": {"data": {"data": data}}}


def test_the_card_of_the_embedded_model_names_its_public_id_and_the_gguf():
    base = {"name": EMBEDDED_HUB_ID, "kind": "embedded", "gguf_file": EMBEDDED_GGUF, "gguf_sha256": "ab" * 32}
    card = ModelCard(model_card(_record(base, data="openai/gsm8k")))
    assert card.data.base_model == EMBEDDED_HUB_ID
    assert f"base_model:adapter:{EMBEDDED_HUB_ID}" in card.data.tags
    assert card.data.datasets == ["openai/gsm8k"]
    assert f"`{EMBEDDED_GGUF}` (sha256 `{'ab' * 32}`)" in card.text
    assert f'AutoModelForCausalLM.from_pretrained("{EMBEDDED_HUB_ID}")' in _snippet(str(card))


def test_a_local_data_file_is_not_listed_as_a_hub_dataset(tmp_path):
    data = write_jsonl(tmp_path / "rows.jsonl", qa_rows(2, seed=0))
    card = ModelCard(model_card(_record({"name": "org/model", "kind": "hub"}, data=str(data))))
    assert card.data.datasets is None and card.data.base_model == "org/model"


def test_save_with_card_after_prepare_model_writes_a_reloadable_adapter(tmp_path):
    folder = tmp_path / "base"
    tiny_model("llama").save_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    peft_model, plan = prepare_model(model, token_rows(4), probe_batches=1, r=2)
    assert plan.base_model == str(folder.resolve())  # read off the loaded model
    card_path = save_with_card(
        peft_model, plan, tmp_path / "adapter", base_model=base_model_reference(folder)
    )
    assert card_path == tmp_path / "adapter" / "README.md"
    assert "## How to load" in card_path.read_text()
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), tmp_path / "adapter")
    torch.testing.assert_close(_logits(reloaded), _logits(peft_model))
    record = json.loads((tmp_path / "adapter" / "aletheia.json").read_text())
    assert record["plan"]["selected_layers"] == plan.selected_layers
