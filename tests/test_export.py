"""`plan.export(fmt)` and `aletheia-lora probe --export`: the selection as PEFT, axolotl and LLaMA-Factory
configs. Each snippet is turned into a PEFT model the way its trainer does it, and must adapt exactly
the modules (and, where the format can say so, with the ranks) that the plan adapts."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml
from conftest import saved_workspace, tiny_model, tiny_multimodal
from peft import LoraConfig, get_peft_model
from torch import nn

from aletheia_lora.cli import main
from aletheia_lora.export import EXPORT_FILES, export_plan
from aletheia_lora.models import EMBEDDED_HUB_ID, base_model_reference
from aletheia_lora.plan import AletheiaPlan, plan_for
from aletheia_lora.scores import LayerScores
from aletheia_lora.settings import AletheiaConfig

SELECTED = [0, 2]  # non-contiguous on purpose
# The keys each trainer reads (see the sources cited in aletheia_lora/export.py).
AXOLOTL_KEYS = {"adapter", "base_model", "lora_r", "lora_alpha", "lora_dropout", "lora_target_linear",
                "lora_target_modules", "lora_target_parameters", "peft_layers_to_transform", "peft_layers_pattern",
                "lora_rank_pattern", "lora_alpha_pattern", "lora_fan_in_fan_out", "peft_use_dora", "peft_use_rslora",
                "peft_init_lora_weights"}  # fmt: skip
LLAMA_FACTORY_KEYS = {
    "model_name_or_path",
    "finetuning_type",
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "lora_target",
    "use_dora",
    "use_rslora",
}


def _plan(family: str = "llama", **config) -> AletheiaPlan:
    model = tiny_model(family)
    scores = LayerScores({i: float(i) for i in range(4)})
    return plan_for(model, scores, SELECTED, AletheiaConfig(r=2, lora_alpha=4, **config))


def _adapted(model: nn.Module) -> dict[str, int]:
    """Every module or parameter a PEFT model adapts -> its LoRA rank (read from the built model)."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(getattr(module, "r", None), dict) and "default" in module.r:
            found[name.removeprefix("base_model.model.")] = module.r["default"]
    return found


def _built(lora_config: LoraConfig, family: str = "llama") -> dict[str, int]:
    return _adapted(get_peft_model(tiny_model(family), lora_config))


def _axolotl_lora_config(cfg: dict) -> LoraConfig:
    """The LoraConfig axolotl builds from its config (loaders/adapter.py: _build_peft_lora_config and
    _build_lora_config_kwargs, which pass the peft_* options only when truthy)."""
    extra = {peft_key: cfg[key] for key, peft_key in (("peft_use_dora", "use_dora"), ("peft_use_rslora", "use_rslora"),
             ("peft_init_lora_weights", "init_lora_weights")) if cfg.get(key)}  # fmt: skip
    return LoraConfig(
        r=cfg["lora_r"],
        lora_alpha=cfg["lora_alpha"],
        target_modules=cfg.get("lora_target_modules") or [],
        target_parameters=cfg.get("lora_target_parameters") or [],
        layers_to_transform=cfg.get("peft_layers_to_transform"),
        layers_pattern=cfg.get("peft_layers_pattern"),
        lora_dropout=cfg["lora_dropout"],
        rank_pattern=cfg.get("lora_rank_pattern") or {},
        alpha_pattern=cfg.get("lora_alpha_pattern") or {},
        task_type="CAUSAL_LM",
        **extra,
    )


def _llama_factory_lora_config(cfg: dict, model: nn.Module | None = None) -> LoraConfig:
    """The LoraConfig LLaMA-Factory builds (model/adapter.py): lora_target split on commas; for a multimodal
    model, ``patch_target_modules`` first replaces the names by every module whose name contains one."""
    names = [t.strip() for t in cfg["lora_target"].split(",")]
    if model is not None:
        names = [name for name, _ in model.named_modules() if any(t in name for t in names)]
    return LoraConfig(r=cfg["lora_rank"], lora_alpha=cfg["lora_alpha"], lora_dropout=cfg["lora_dropout"],
                      target_modules=names, use_dora=cfg.get("use_dora", False),
                      use_rslora=cfg.get("use_rslora", False), task_type="CAUSAL_LM")  # fmt: skip


def _notes(text: str) -> list[str]:
    """The ``# NOT EXACT:`` paragraphs of a YAML export, each joined into one line."""
    comment = " ".join(line[1:].strip() for line in text.splitlines() if line.startswith("#"))
    return comment.split("NOT EXACT: ")[1:]


def _is_attention(name: str) -> bool:
    return any(word in name for word in ("attn", "attention"))


@pytest.mark.parametrize("family", ["llama", "gpt2", "mixtral"])
def test_peft_export_loads_and_adapts_exactly_the_planned_modules_and_ranks(family, tmp_path):
    plan = _plan(family)
    (tmp_path / "adapter_config.json").write_text(plan.export("peft"))
    loaded = LoraConfig.from_pretrained(tmp_path)
    built = _built(loaded, family)
    assert built == _built(plan.lora_config, family)  # the very adapter prepare_model trains
    # and, read off the model alone: the selected layers, attention at r=2, everything else at 4 x 2
    layers = {int(name.split(".h.")[-1].split(".")[0]) if ".h." in name else int(name.split(".layers.")[1].split(".")[0])
              for name in built}  # fmt: skip
    assert layers == set(SELECTED)
    assert {r for name, r in built.items() if _is_attention(name)} == {2}
    assert {r for name, r in built.items() if not _is_attention(name)} == {8}
    if family == "mixtral":  # the 3-D expert tensors are adapted too
        assert any("experts" in name for name in built)
    if family == "gpt2":
        assert loaded.fan_in_fan_out is True
    assert loaded.inference_mode is False


def test_peft_export_of_a_uniform_rank_plan_has_no_rank_pattern():
    data = json.loads(_plan(mlp_rank_factor=1).export("peft"))
    assert data["r"] == 2 and data["rank_pattern"] == {} and data["layers_to_transform"] == SELECTED


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_axolotl_export_carries_the_keys_axolotl_reads_and_means_the_same_adapter(family):
    plan = _plan(family)
    text = plan.export("axolotl")
    cfg = yaml.safe_load(text)
    assert set(cfg) <= AXOLOTL_KEYS, set(cfg) - AXOLOTL_KEYS
    assert cfg["adapter"] == "lora" and cfg["lora_target_linear"] is False
    assert cfg["lora_r"] == 2 and cfg["lora_alpha"] == 4 and isinstance(cfg["lora_alpha"], int)
    assert cfg["peft_layers_to_transform"] == SELECTED and cfg["peft_layers_pattern"] == ["layers"]
    assert set(cfg["lora_rank_pattern"].values()) == {8} and set(cfg["lora_alpha_pattern"].values()) == {16}
    assert "NOT EXACT" not in text  # axolotl can say all of it
    assert "lora_rank_pattern / lora_alpha_pattern need axolotl >= 0.18.0" in text  # older ones drop them
    # the LoraConfig axolotl builds from these keys (loaders/adapter.py: _build_peft_lora_config)
    built = _built(_axolotl_lora_config(cfg), family)
    assert built == _built(plan.lora_config, family)


def test_llama_factory_export_names_the_selected_modules_and_says_what_it_cannot_keep():
    plan = _plan()
    text = plan.export("llama-factory")
    cfg = yaml.safe_load(text)
    assert set(cfg) <= LLAMA_FACTORY_KEYS, set(cfg) - LLAMA_FACTORY_KEYS
    assert cfg["finetuning_type"] == "lora" and cfg["lora_rank"] == 2 and cfg["lora_alpha"] == 4
    # LLaMA-Factory splits lora_target on commas and hands the names to PEFT (model/adapter.py)
    built = _built(_llama_factory_lora_config(cfg))
    assert set(built) == set(_built(plan.lora_config))  # the same modules of the same layers
    assert set(built.values()) == {2}  # one rank for all: the export must say so
    notes = _notes(text)
    assert len(notes) == 1 and "mlp.up_proj: r=8, alpha=16" in notes[0] and "--export peft" in notes[0]


def test_llama_factory_export_of_a_uniform_plan_is_exact_and_moe_experts_are_named_as_left_out():
    assert "NOT EXACT" not in _plan(mlp_rank_factor=1).export("llama-factory")
    plan = _plan("mixtral", mlp_rank_factor=1)
    text = plan.export("llama-factory")
    notes = _notes(text)
    assert len(notes) == 1 and "cannot target parameters" in notes[0]
    for path in plan.lora_config.target_parameters:
        assert path in notes[0]


def test_unknown_format_is_refused_with_the_formats():
    with pytest.raises(
        ValueError, match=r"'unsloth' is unknown; use one of \['peft', 'axolotl', 'llama-factory'\]"
    ):
        export_plan(_plan(), "unsloth")


def test_plan_json_round_trip_keeps_what_exports_need():
    plan = _plan()
    plan.base_model = "org/model"
    again = AletheiaPlan.from_json(plan.to_json())
    assert again.blocks_path == "model.layers" and again.base_model == "org/model"
    for fmt in EXPORT_FILES:
        assert again.export(fmt) == plan.export(fmt)
    assert yaml.safe_load(plan.export("axolotl"))["base_model"] == "org/model"
    assert json.loads(plan.export("peft"))["base_model_name_or_path"] == "org/model"


def test_base_model_reference_names_hub_ids_local_folders_and_the_embedded_cache(tmp_path, monkeypatch):
    assert base_model_reference("org/name") == {"name": "org/name", "kind": "hub"}
    folder = tmp_path / "my-model"
    folder.mkdir()
    assert base_model_reference(folder) == {"name": str(folder.resolve()), "kind": "local"}
    monkeypatch.setenv("ALETHEIA_LORA_CACHE", str(tmp_path / "cache"))
    cached = tmp_path / "cache" / "smollm2-135m-instruct-0123456789abcdef"
    cached.mkdir(parents=True)
    ref = base_model_reference(cached)
    assert ref["name"] == EMBEDDED_HUB_ID and ref["kind"] == "embedded"
    assert ref["gguf_file"].endswith(".gguf")


# --------------------------------------------------------------------------- multimodal wrappers


@pytest.fixture(scope="module", params=["gemma3", "llava"])
def multimodal(request) -> tuple[str, AletheiaPlan]:
    model = tiny_multimodal(request.param)
    scores = LayerScores({i: float(i) for i in range(4)})
    return request.param, plan_for(model, scores, SELECTED, AletheiaConfig(r=2, lora_alpha=4))


def _built_multimodal(kind: str, lora_config: LoraConfig) -> dict[str, int]:
    return _adapted(get_peft_model(tiny_multimodal(kind), lora_config))


def _only_language_blocks(built: dict[str, int]) -> None:
    vision = sorted(name for name in built if not name.startswith("model.language_model.layers."))
    assert not vision, f"adapters outside the language model: {vision[:4]}"
    assert {int(name.split(".layers.")[1].split(".")[0]) for name in built} == set(SELECTED)
    assert len(built) == 7 * len(SELECTED)  # q/k/v/o and gate/up/down of each selected block


def test_the_short_layers_pattern_would_adapt_the_vision_tower(multimodal):
    kind, plan = multimodal
    vision = [n for n in _built_multimodal(kind, dataclasses.replace(plan.lora_config, layers_pattern="layers"))
              if "vision" in n]  # fmt: skip
    assert vision  # what the plan must not do: the tower's encoder.layers.N.self_attn.q_proj match too


def test_multimodal_plan_and_every_export_adapt_only_the_language_models_selected_blocks(
    multimodal, tmp_path
):
    kind, plan = multimodal
    assert plan.blocks_path == "model.language_model.layers"
    built = _built_multimodal(kind, plan.lora_config)
    _only_language_blocks(built)

    (tmp_path / "adapter_config.json").write_text(plan.export("peft"))
    assert _built_multimodal(kind, LoraConfig.from_pretrained(tmp_path)) == built

    text = plan.export("axolotl")
    cfg = yaml.safe_load(text)
    assert set(cfg) <= AXOLOTL_KEYS and "NOT EXACT" not in text
    assert _built_multimodal(kind, _axolotl_lora_config(cfg)) == built

    cfg = yaml.safe_load(plan.export("llama-factory"))
    as_named = _built_multimodal(kind, _llama_factory_lora_config(cfg))
    patched = _built_multimodal(kind, _llama_factory_lora_config(cfg, tiny_multimodal(kind)))
    assert set(as_named) == set(patched) == set(built)  # one rank for all, as its NOT EXACT note says


def test_text_only_plans_keep_the_short_layers_pattern():
    assert _plan().lora_config.layers_pattern == "layers"
    assert _plan("gpt2").lora_config.layers_pattern == "h"


# --------------------------------------------------------------------------- DoRA, rsLoRA, initialization


def _variant_modules(built_model: nn.Module) -> dict[str, tuple[bool, float, bool]]:
    """name -> (DoRA, scaling, init) of every LoRA layer of the 'default' adapter."""
    out = {}
    for name, module in built_model.named_modules():
        if isinstance(getattr(module, "r", None), dict) and "default" in module.r:
            out[name] = (bool(module.use_dora["default"]), module.scaling["default"], module.r["default"])
    return out


def test_every_export_carries_dora_rslora_and_the_initialization(tmp_path):
    plan = _plan(mlp_rank_factor=1, use_dora=True, use_rslora=True, init_lora_weights="gaussian")
    expected = _variant_modules(get_peft_model(tiny_model("llama"), plan.lora_config))
    assert expected and all(
        dora and scaling == pytest.approx(4 / 2**0.5) for dora, scaling, _ in expected.values()
    )

    (tmp_path / "adapter_config.json").write_text(plan.export("peft"))
    loaded = LoraConfig.from_pretrained(tmp_path)
    assert (loaded.use_dora, loaded.use_rslora, loaded.init_lora_weights) == (True, True, "gaussian")

    text = plan.export("axolotl")
    cfg = yaml.safe_load(text)
    assert (cfg["peft_use_dora"], cfg["peft_use_rslora"], cfg["peft_init_lora_weights"]) == (
        True,
        True,
        "gaussian",
    )
    assert "NOT EXACT" not in text
    axolotl = _axolotl_lora_config(cfg)
    assert axolotl.init_lora_weights == "gaussian"
    assert _variant_modules(get_peft_model(tiny_model("llama"), axolotl)) == expected

    text = plan.export("llama-factory")
    cfg = yaml.safe_load(text)
    assert set(cfg) <= LLAMA_FACTORY_KEYS and cfg["use_dora"] is True and cfg["use_rslora"] is True
    assert _variant_modules(get_peft_model(tiny_model("llama"), _llama_factory_lora_config(cfg))) == expected
    notes = _notes(text)  # LLaMA-Factory has no gaussian initialization
    assert len(notes) == 1 and "'gaussian'" in notes[0] and "peft export" in notes[0]


def test_plain_lora_exports_write_no_variant_keys_and_init_false_is_flagged_for_axolotl():
    cfg = yaml.safe_load(_plan().export("axolotl"))
    assert not {"peft_use_dora", "peft_use_rslora", "peft_init_lora_weights"} & set(cfg)
    assert not {"use_dora", "use_rslora"} & set(yaml.safe_load(_plan().export("llama-factory")))
    notes = _notes(_plan(init_lora_weights="false").export("axolotl"))
    assert len(notes) == 1 and "init_lora_weights: false" in notes[0]


# --------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export")
    saved_workspace(root, n_rows=12)
    return root


def _probe(ws: Path, out: Path, *extra: str) -> int:
    return main(["probe", "--model", str(ws / "model"), "--data", str(ws / "data.jsonl"), "--output_dir", str(out),
                 "--probe_batches", "1", "--max_length", "16", "--r", "2", *extra])  # fmt: skip


def test_probe_export_writes_the_file_and_prints_its_path(workspace, tmp_path, capsys):
    out = tmp_path / "probe"
    assert _probe(workspace, out, "--export", "axolotl", "--quiet", "true") == 0
    path = out / "axolotl.yaml"
    assert capsys.readouterr().out.strip() == f"axolotl config: {path}"
    cfg = yaml.safe_load(path.read_text())
    scores = json.loads((out / "layer_scores.json").read_text())
    assert cfg["peft_layers_to_transform"] == scores["meta"]["selected_layers"]
    assert cfg["base_model"] == str((workspace / "model").resolve())
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp leftovers

    before = path.read_bytes()
    assert (
        _probe(workspace, out, "--export", "peft", "--quiet", "true") == 1
    )  # refused: the folder is not empty
    assert "--overwrite_output_dir" in capsys.readouterr().err
    assert path.read_bytes() == before and not (out / "adapter_config.json").exists()
    assert (
        _probe(workspace, out, "--export", "peft", "--overwrite_output_dir", "true", "--quiet", "true") == 0
    )
    assert LoraConfig.from_pretrained(out).layers_to_transform == scores["meta"]["selected_layers"]


def test_probe_refuses_an_unknown_export_format_before_loading(workspace, tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        _probe(workspace, tmp_path / "o", "--export", "unsloth")
    assert err.value.code == 2 and "invalid choice: 'unsloth'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
