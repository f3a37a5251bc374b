"""QLoRA: a 4-bit (bitsandbytes nf4) base, on the CPU. The probe measures the 4-bit linears from their
real inputs and output gradients; the truncated backward stops below the lowest adapted block even after
PEFT's k-bit preparation forces inputs to require grad; the adapter reloads on the 4-bit and the float base."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from conftest import tiny_config, token_rows, word_tokenizer
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM

from aletheia_lora import AletheiaConfig, apply_aletheia_lora, prepare_model
from aletheia_lora.architecture import dense_weight, find_blocks
from aletheia_lora.batches import collate
from aletheia_lora.lora_config import lora_param_count
from aletheia_lora.models import is_quantized, load_model, quantization_config
from aletheia_lora.probe import gradient_probe
from aletheia_lora.settings import ModelSettings
from aletheia_lora.truncation import truncate_backward

HAVE_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_bnb = pytest.mark.skipif(
    not HAVE_BNB, reason="bitsandbytes is not installed (pip install 'aletheia-lora[qlora]')"
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny 4-layer Llama with a tokenizer, saved: the float reference. Hidden size 64: bitsandbytes'
    CPU inference kernel (eval mode, no grad) needs at least one 64-value quantization block per row."""
    root = tmp_path_factory.mktemp("qlora") / "model"
    config = tiny_config("llama", num_layers=4)
    config.hidden_size, config.intermediate_size, config.head_dim = 64, 128, 16
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(root)
    word_tokenizer().save_pretrained(root)
    return root


def _four_bit(folder):
    model, _ = load_model(folder, quantization="4bit")
    return model


def _dequantized_twin(quantized, folder):
    """The same model in float32 with every 4-bit weight replaced by its dequantized value."""
    model, _ = load_model(folder, dtype="float32")
    for name, module in quantized.named_modules():
        if type(module).__name__ == "Linear4bit":
            model.get_submodule(name).weight.data = dense_weight(module.weight).float().clone()
    return model


def test_settings_name_the_quantization():
    assert ModelSettings().quantization_kwargs() == {}
    kw = ModelSettings(load_in_4bit=True, bnb_4bit_compute_dtype="bf16").quantization_kwargs()
    assert kw == {"quantization": "4bit", "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                  "bnb_4bit_compute_dtype": "bfloat16"}  # fmt: skip
    with pytest.raises(ValueError, match="both set"):
        ModelSettings(load_in_4bit=True, load_in_8bit=True)
    with pytest.raises(ValueError, match="bnb_4bit_compute_dtype"):
        ModelSettings(load_in_4bit=True, bnb_4bit_compute_dtype="auto")


def test_missing_bitsandbytes_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    with pytest.raises(ImportError, match=r"pip install 'aletheia-lora\[qlora\]'"):
        quantization_config("4bit")


@needs_bnb
def test_load_in_4bit_is_nf4_double_quant_and_prepared(saved):
    model = _four_bit(saved)
    config = model.config.quantization_config
    assert is_quantized(model) and config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.float32  # on a CPU
    q_proj = find_blocks(model).blocks[0].self_attn.q_proj
    assert type(q_proj).__name__ == "Linear4bit" and q_proj.weight.dtype == torch.uint8
    assert not any(p.requires_grad for p in model.parameters())  # prepare_model_for_kbit_training froze it
    assert not any(
        getattr(b, "gradient_checkpointing", False) for b in find_blocks(model).blocks
    )  # the trainer's


@needs_bnb
@pytest.mark.parametrize("params", ["lora-targets", "all"])
def test_probe_on_4bit_matches_the_dequantized_float_model(saved, params):
    quantized = _four_bit(saved)
    twin = _dequantized_twin(quantized, saved)
    rows = token_rows(6)
    got = gradient_probe(quantized, rows, probe_batches=3, params=params, signals="all")
    want = gradient_probe(twin, rows, probe_batches=3, params=params, signals="all")
    assert set(got.modules[0]) == set(want.modules[0])  # the packed 4-bit weights are probed too
    for signal in ("grad-norm", "relative", "lora-energy", "coherence"):
        for layer in range(4):
            assert got.signals[signal][layer] == pytest.approx(want.signals[signal][layer], rel=1e-3), signal
    # the hooks measured the layer's real shape: a float probe of the *original* weights is close, not equal
    assert all(v > 0 for v in got.values())


@needs_bnb
def test_chunked_probe_is_refused_on_4bit(saved):
    with pytest.raises(ValueError, match="onepass"):
        gradient_probe(_four_bit(saved), token_rows(2), probe_batches=1, method="chunked")


@needs_bnb
def test_lora_parameter_count_uses_the_layer_shape_not_the_packed_weight(saved):
    quantized = _four_bit(saved)
    twin = _dequantized_twin(quantized, saved)
    config = apply_aletheia_lora(twin, [1, 3], r=4)
    assert lora_param_count(quantized, config) == lora_param_count(twin, config) > 0


def _backward_blocks(peft_model) -> set[int]:
    """Blocks a gradient flowed through on one training step."""
    reached: set[int] = set()
    handles = []
    for i, block in enumerate(find_blocks(peft_model).blocks):

        def hook(module, args, output, i=i):
            out = output[0] if isinstance(output, tuple) else output
            if out.requires_grad:
                out.register_hook(lambda g, i=i: reached.add(i))

        handles.append(block.register_forward_hook(hook))
    peft_model.train()
    peft_model(**collate(token_rows(2))).loss.backward()
    for h in handles:
        h.remove()
    return reached


@needs_bnb
@pytest.mark.parametrize("checkpointing", [False, True])
def test_truncated_backward_on_4bit_after_kbit_preparation(saved, checkpointing):
    """prepare_model_for_kbit_training (checkpointing on by default, inputs forced to require grad), as a
    user's script runs it: no backward below the lowest adapted block, and the LoRA gradients as untruncated."""
    base = prepare_model_for_kbit_training(_four_bit(saved), use_gradient_checkpointing=checkpointing)
    if not checkpointing:  # then PEFT leaves the inputs alone; trainers (TRL, axolotl) force them too
        base.enable_input_require_grads()
    torch.manual_seed(0)  # the same LoRA initialisation for both
    reference = get_peft_model(copy.deepcopy(base), apply_aletheia_lora(base, [2, 3], r=4))
    assert _backward_blocks(reference) == {0, 1, 2, 3}, "without truncation the backward reaches block 0"
    torch.manual_seed(0)
    model = get_peft_model(base, apply_aletheia_lora(base, [2, 3], r=4))
    assert truncate_backward(model) == 2
    assert _backward_blocks(model) == {2, 3}
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)


@needs_bnb
def test_prepare_model_on_4bit_trains_and_reloads_on_4bit_and_float_bases(saved, tmp_path):
    quantized = _four_bit(saved)
    twin = _dequantized_twin(quantized, saved)
    peft_model, plan = prepare_model(quantized, token_rows(8), AletheiaConfig(top_k=2, r=4, probe_batches=2))
    assert plan.trainable_params == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    lowest = min(plan.selected_layers)
    assert _backward_blocks(peft_model) == set(range(lowest, 4))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        peft_model(**collate(token_rows(2))).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.save_pretrained(tmp_path / "adapter")
    saved_state = {k: v.clone() for k, v in peft_model.state_dict().items() if "lora_" in k}
    ids = torch.randint(3, 100, (1, 9))
    peft_model.eval()
    with torch.no_grad():
        trained_logits = peft_model(input_ids=ids).logits

    # the twin (built before LoRA wrapped the 4-bit model) holds the dequantized weights: the same function
    # up to the rounding of bitsandbytes' CPU inference kernel (bf16)
    for base, atol in ((_four_bit(saved), 1e-5), (twin, 1e-2)):
        reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        state = {k: v for k, v in reloaded.state_dict().items() if "lora_" in k}
        assert state.keys() == saved_state.keys()
        for k in state:
            torch.testing.assert_close(state[k], saved_state[k])
        with torch.no_grad():
            logits = reloaded(input_ids=ids).logits
            with reloaded.disable_adapter():
                without = reloaded(input_ids=ids).logits
        torch.testing.assert_close(logits, trained_logits, rtol=0, atol=atol)
        assert (without - trained_logits).abs().max() > 10 * atol  # the trained adapter changes the output


@needs_bnb
def test_train_command_with_load_in_4bit(saved, tmp_path):
    """`aletheia-lora train --load_in_4bit true` end to end: probe, select, train, save; the plan records it."""
    import json

    from conftest import qa_rows, write_jsonl

    from aletheia_lora.cli import main

    data = write_jsonl(tmp_path / "data.jsonl", qa_rows(16, seed=0))
    out = tmp_path / "run"
    rc = main(["train", "--model", str(saved), "--data", str(data), "--output_dir", str(out), "--load_in_4bit",
               "true", "--max_steps", "2", "--per_device_train_batch_size", "2", "--max_length", "32",
               "--eval_generate", "0", "--max_eval_samples", "4", "--probe_batches", "2", "--top_k", "2",
               "--save_strategy", "no", "--report_to", "none", "--quiet", "true", "--use_cpu", "true"])  # fmt: skip
    assert rc == 0
    record = json.loads((out / "aletheia.json").read_text())
    assert record["settings"]["model"]["load_in_4bit"] is True
    assert record["train_steps"] == 2 and (out / "adapter_model.safetensors").is_file()
    selected = record["plan"]["selected_layers"]
    reloaded = PeftModel.from_pretrained(_four_bit(saved), out)
    adapted = {
        int(n.split(".layers.")[1].split(".")[0]) for n, _ in reloaded.named_parameters() if "lora_A" in n
    }
    assert adapted == set(selected) and len(selected) == 2


@needs_bnb
def test_bench_compares_4bit_with_float_step_time_and_peak_memory(tmp_path):
    from aletheia_lora.bench import run_bench

    result = run_bench(random_init="smollm2-135m", num_layers=2, seq_len=16, batch_size=2, steps=1, warmup=0,
                       rounds=1, arms=["top"], gradient_checkpointing="off", load_in_4bit=True,
                       output_dir=str(tmp_path / "b"), log=None)  # fmt: skip
    assert result["model"]["weights"] == "4-bit nf4, double quant, compute float32"
    rows = result["weights_comparison"]
    assert [(r["weights"].split(",")[0], r["arm"]) for r in rows] == [
        ("4-bit nf4", "lora-all"), ("4-bit nf4", "top"), ("float32", "lora-all"), ("float32", "top")
    ]  # fmt: skip
    assert all(r["median_ms"] > 0 and r["peak_memory_bytes"] > 0 for r in rows)  # Linux: VmHWM
    assert "VmHWM" in rows[0]["memory_measure"]
    assert "| 4-bit nf4, double quant, compute float32 | lora-all |" in result["table"]
    assert "peak memory (base + steps)" in (tmp_path / "b" / "bench.md").read_text()


@needs_bnb
def test_load_in_8bit_probes_and_trains(saved):
    model, _ = load_model(saved, quantization="8bit")
    q_proj = find_blocks(model).blocks[0].self_attn.q_proj
    assert type(q_proj).__name__ == "Linear8bitLt" and q_proj.weight.dtype == torch.int8
    twin, _ = load_model(saved, dtype="float32")
    for name, module in model.named_modules():
        if type(module).__name__ == "Linear8bitLt":
            twin.get_submodule(name).weight.data = dense_weight(module.weight).float().clone()
    rows = token_rows(6)
    got = gradient_probe(model, rows, probe_batches=2, signals="relative")
    want = gradient_probe(twin, rows, probe_batches=2, signals="relative")
    for signal in ("grad-norm", "relative"):  # int8 matmuls run on fp16-rounded inputs
        for layer in range(4):
            assert got.signals[signal][layer] == pytest.approx(want.signals[signal][layer], rel=0.02), signal
    peft_model, plan = prepare_model(model, rows, AletheiaConfig(top_k=2, r=4, probe_batches=2))
    assert _backward_blocks(peft_model) == set(range(min(plan.selected_layers), 4))
