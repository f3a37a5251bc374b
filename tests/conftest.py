"""Tiny random-init models of every supported family, built from configs (no downloads)."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch
import transformers as T
from torch import nn
from transformers.pytorch_utils import Conv1D

os.environ.setdefault("HF_HUB_OFFLINE", "1")
T.logging.set_verbosity_error()

# family -> (config class, extra config kwargs)
FAMILIES: dict[str, tuple[type, dict]] = {
    "llama": (T.LlamaConfig, {}),
    "qwen2": (T.Qwen2Config, {}),
    "qwen3": (T.Qwen3Config, {}),
    "mistral": (T.MistralConfig, {}),
    "gemma": (T.GemmaConfig, {}),
    "gemma2": (T.Gemma2Config, {}),
    "gemma3_text": (T.Gemma3TextConfig, {}),
    "phi": (T.PhiConfig, {}),
    "phi3": (T.Phi3Config, {}),
    "gpt2": (T.GPT2Config, {}),
    "gpt_neox": (T.GPTNeoXConfig, {}),
    "falcon": (T.FalconConfig, {}),
    "bloom": (T.BloomConfig, {}),
    "opt": (T.OPTConfig, {"ffn_dim": 64, "word_embed_proj_dim": 32}),
    "stablelm": (T.StableLmConfig, {}),
    "mixtral": (T.MixtralConfig, {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2_moe": (
        T.Qwen2MoeConfig,
        {
            "moe_intermediate_size": 16,
            "shared_expert_intermediate_size": 32,
            "num_experts": 4,
            "num_experts_per_tok": 2,
        },
    ),
}
VOCAB = 128
_NO_GQA = {"gpt2", "bloom", "opt", "falcon", "phi", "gpt_neox"}


def tiny_config(family: str, num_layers: int = 4):
    cls, extra = FAMILIES[family]
    if family == "gpt2":
        kw = {"n_embd": 32, "n_layer": num_layers, "n_head": 4}
    elif family == "bloom":
        kw = {"hidden_size": 32, "n_layer": num_layers, "n_head": 4}
    else:
        kw = {
            "hidden_size": 32,
            "num_hidden_layers": num_layers,
            "num_attention_heads": 4,
            "intermediate_size": 64,
        }
    if family not in _NO_GQA:
        kw.update(head_dim=8, num_key_value_heads=2)
    kw.update(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra)
    return cls(**kw)


def tiny_model(family: str = "llama", num_layers: int = 4, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return T.AutoModelForCausalLM.from_config(tiny_config(family, num_layers))


def token_rows(n: int = 8, seed: int = 0, lengths=(10, 17, 5, 23, 9, 12)) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [
        {"input_ids": torch.randint(3, VOCAB, (lengths[i % len(lengths)],), generator=g).tolist()}
        for i in range(n)
    ]


WORDS = "the a cat dog sat on mat and ran to is was big small red blue one two".split()


def qa_rows(n: int, seed: int, words: int = 5) -> list[dict]:
    """Question/answer rows in GSM8K's shape: a few words and two digits; the answer ends in ``#### sum``."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        question = " ".join(rng.choice(WORDS) for _ in range(words)) + f" {a} and {b}"
        rows.append({"question": question, "answer": f"the {a + b}\n#### {a + b}"})
    return rows


def write_jsonl(path, rows: list[dict]):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def word_tokenizer():
    """A whitespace word-level tokenizer over a small vocabulary, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = "[PAD] [BOS] [EOS] [UNK] the a cat dog sat on mat and ran to is was big small red blue one two".split()
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return T.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]", unk_token="[UNK]"
    )


@pytest.fixture
def llama():
    return tiny_model("llama")


@pytest.fixture
def rows():
    return token_rows()


def expected_probed_names(block: nn.Module, params: str) -> set[str]:
    """Which tensors of a block the probe should score, decided independently of the library."""
    if params == "all":
        return {n for n, p in block.named_parameters() if p.is_floating_point()}
    names = set()
    for mod_name, module in block.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(module, (nn.Linear, Conv1D)):
            names.add(f"{prefix}weight")
        elif "Router" in type(module).__name__ and isinstance(getattr(module, "weight", None), nn.Parameter):
            names.add(f"{prefix}weight")
        else:
            for p_name, p in module.named_parameters(recurse=False):
                if p.dim() == 3:
                    names.add(f"{prefix}{p_name}")
    return names


def saved_workspace(root, n_rows: int = 16):
    """``root/model`` (a tiny 4-layer Llama + word tokenizer, saved) and ``root/data.jsonl`` (Q/A rows)."""
    tiny_model("llama", num_layers=4).save_pretrained(root / "model")
    word_tokenizer().save_pretrained(root / "model")
    write_jsonl(root / "data.jsonl", qa_rows(n_rows, seed=0))
    return root


def tiny_multimodal(kind: str = "gemma3", num_layers: int = 4, seed: int = 0) -> torch.nn.Module:
    """A tiny random-init image-text model whose decoder blocks sit at ``model.language_model.layers`` and
    whose vision tower has ``encoder.layers.N.self_attn.{q,k,v}_proj`` too (Gemma-3 with SigLIP, LLaVA with CLIP)."""
    torch.manual_seed(seed)
    text = {"hidden_size": 32, "num_hidden_layers": num_layers, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 8, "intermediate_size": 64, "vocab_size": VOCAB}  # fmt: skip
    vision = {"hidden_size": 32, "num_hidden_layers": num_layers, "num_attention_heads": 4, "intermediate_size": 64,
              "image_size": 28, "patch_size": 14}  # fmt: skip
    if kind == "gemma3":
        config = T.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                image_token_index=VOCAB - 1, boi_token_index=VOCAB - 3, eoi_token_index=VOCAB - 2)  # fmt: skip
        return T.Gemma3ForConditionalGeneration(config)
    if kind == "llava":
        config = T.LlavaConfig(text_config=T.LlamaConfig(**text), vision_config=T.CLIPVisionConfig(**vision),
                               image_token_index=VOCAB - 1)  # fmt: skip
        return T.LlavaForConditionalGeneration(config)
    raise ValueError(f"kind={kind!r}; use 'gemma3' or 'llava'.")
