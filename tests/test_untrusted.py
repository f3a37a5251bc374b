"""Untrusted inputs: no remote code unless asked for, no pickle for the library's own files, and every
score / plan / eval file the library writes is plain JSON (adapters are safetensors)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
from pathlib import Path

import pytest
from conftest import tiny_model, word_tokenizer
from safetensors.torch import load_file

import aletheia_lora
from aletheia_lora import bench, eval, models, settings, study
from aletheia_lora.cli import main

SRC = Path(aletheia_lora.__file__).parent
# Files allowed to mention pickle / torch.load, each with the reason. Empty: nothing in the library
# unpickles. (transformers.Trainer itself writes optimizer.pt, scheduler.pt, rng_state.pth and
# training_args.bin into checkpoint-N folders and reads them back on --resume_from_checkpoint; that is
# Trainer's format, documented in docs/reliability.md, not a file of this library.)
PICKLE_ALLOWED: dict[str, str] = {}
PICKLE_MAGIC = b"\x80"  # protocol 2+ pickles (and torch.save zip files start with b"PK")


def test_trust_remote_code_defaults_to_false_everywhere():
    holders = [
        cls
        for module in (settings, eval, bench, study)
        for _, cls in inspect.getmembers(module, dataclasses.is_dataclass)
        if "trust_remote_code" in {f.name for f in dataclasses.fields(cls)}
    ]
    assert {c.__name__ for c in holders} >= {
        "ModelSettings",
        "EvalArguments",
        "BenchArguments",
        "StudyArguments",
    }
    for cls in holders:
        field = next(f for f in dataclasses.fields(cls) if f.name == "trust_remote_code")
        assert field.default is False, cls
    assert settings.ModelSettings().trust_remote_code is False
    for fn in (models.load_model, eval.eval_job):
        assert inspect.signature(fn).parameters["trust_remote_code"].default is False, fn


def test_load_model_passes_trust_remote_code_false_by_default(tmp_path, monkeypatch):
    import transformers as T

    tiny_model("llama", num_layers=2).save_pretrained(tmp_path / "m")
    word_tokenizer().save_pretrained(tmp_path / "m")
    seen = []
    for cls in (T.AutoModelForCausalLM, T.AutoTokenizer):
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _original=original, **kwargs):
            seen.append((klass.__name__, kwargs.get("trust_remote_code", False)))
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    models.load_model(tmp_path / "m")
    assert sorted(seen) == [("AutoModelForCausalLM", False), ("AutoTokenizer", False)]


def test_the_library_never_unpickles():
    pattern = re.compile(
        r"\bpickle\b|\bcloudpickle\b|\bdill\b|torch\.load\(|\bjoblib\b|weights_only\s*=\s*False"
    )
    found = {
        str(path.relative_to(SRC)): [
            n for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)
        ]
        for path in sorted(SRC.rglob("*.py"))
    }
    found = {name: lines for name, lines in found.items() if lines and name not in PICKLE_ALLOWED}
    assert not found, f"pickle / torch.load in {found}; use JSON or safetensors (or allow-list it, with why)"


def test_eval_and_bench_records_are_written_as_json():
    # Static check for the writers too slow to run here: each .json record goes through json.dumps.
    for module, name in ((eval, "eval.json"), (bench, "bench.json")):
        source = inspect.getsource(module)
        writes = re.findall(rf'atomic_write_text\(out / "{re.escape(name)}", (\w+(?:\.\w+)?)\(', source)
        assert writes == ["json.dumps"], (module.__name__, writes)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("untrusted")
    tiny_model("llama", num_layers=4).save_pretrained(root / "model")
    word_tokenizer().save_pretrained(root / "model")
    words = "the a cat dog sat on mat and ran to".split()
    with open(root / "data.jsonl", "w") as f:
        for i in range(24):
            f.write(json.dumps({"question": " ".join(words[i % 7 :]), "answer": f"the {i}"}) + "\n")
    base = ["--model", str(root / "model"), "--data", str(root / "data.jsonl"), "--max_length", "32",
            "--probe_batches", "2"]  # fmt: skip
    assert main(["probe", *base, "--output_dir", str(root / "probe"), "--quiet", "true"]) == 0
    assert main(["train", *base, "--output_dir", str(root / "train"), "--max_steps", "1", "--save_steps", "100",
                 "--per_device_train_batch_size", "2", "--eval_generate", "1", "--max_eval_samples", "2",
                 "--disable_tqdm", "true", "--quiet", "true"])  == 0  # fmt: skip
    return {"probe": root / "probe", "train": root / "train"}


@pytest.mark.parametrize("job", ["probe", "train"])
def test_scores_and_plan_files_are_json_and_weights_safetensors(runs, job):
    out = runs[job]
    files = [p for p in out.iterdir() if p.is_file()]
    assert files
    for path in files:
        raw = path.read_bytes()
        assert not raw.startswith((PICKLE_MAGIC, b"PK")), path  # no pickle, no torch.save zip
        if path.suffix == ".json":
            json.loads(raw)
        elif path.suffix == ".safetensors":
            load_file(path)
        else:
            assert path.suffix in {".png", ".md"}, path
    names = {p.name for p in files}
    expected = {"layer_scores.json"} if job == "probe" else {"aletheia.json", "adapter_model.safetensors"}
    assert expected <= names
