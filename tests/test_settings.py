"""One settings model: each shared flag is declared once, and every command rejects a bad value the
same way, while parsing, before a model is loaded."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from aletheia_lora import bench, eval, settings, study, train
from aletheia_lora.cli import main
from aletheia_lora.settings import AletheiaConfig, BudgetSettings, DataSettings, ModelSettings


def _declared_in(name: str) -> list[str]:
    """The dataclasses of the package that declare field ``name`` themselves (not by inheritance)."""
    out = []
    for module in (settings, bench, study, eval, train):
        for cls_name, cls in inspect.getmembers(module, inspect.isclass):
            if dataclasses.is_dataclass(cls) and cls.__module__ == module.__name__:
                if name in cls.__dict__.get("__annotations__", {}):
                    out.append(f"{module.__name__.rsplit('.', 1)[-1]}.{cls_name}")
    return sorted(set(out))


@pytest.mark.parametrize("name", ["model", "dtype", "trust_remote_code", "top_pct", "top_k", "target_speedup",
                                  "overwrite_output_dir", "quiet"])  # fmt: skip
def test_shared_flags_are_declared_once(name):
    declared = _declared_in(name)
    assert len(declared) == 1 and declared[0].startswith("settings."), declared


def test_the_commands_compose_the_shared_groups():
    assert issubclass(bench.BenchArguments, (ModelSettings, BudgetSettings))
    assert issubclass(study.StudyArguments, (ModelSettings, BudgetSettings))
    assert issubclass(eval.EvalArguments, ModelSettings)
    assert issubclass(AletheiaConfig, BudgetSettings)


@pytest.mark.parametrize(
    "build",
    [
        lambda: AletheiaConfig(top_pct=0),
        lambda: BudgetSettings(top_pct=0),
        lambda: bench.BenchArguments(top_pct=0),
        lambda: study.StudyArguments(top_pct=0, gsm8k_dir="nowhere", output_dir="o"),
    ],
)
def test_one_message_for_a_bad_budget_whoever_checks_it(build):
    with pytest.raises(ValueError) as err:
        build()
    assert str(err.value) == "top_pct=0; it must be a percentage in (0, 100], e.g. 50."


def test_other_groups_check_themselves():
    with pytest.raises(ValueError, match="dtype='fp8'"):
        ModelSettings(dtype="fp8")
    with pytest.raises(ValueError, match="eval_fraction=1.5"):
        DataSettings(eval_fraction=1.5)
    with pytest.raises(ValueError, match="r=0"):
        AletheiaConfig(r=0)
    with pytest.raises(ValueError, match="target_speedup=1.5; it needs strategy='depth-aware'"):
        AletheiaConfig(target_speedup=1.5)


@pytest.mark.parametrize("command", ["probe", "train", "bench", "study"])
def test_every_command_rejects_a_bad_budget_before_loading_the_model(command, tmp_path, capsys):
    # the model folder does not exist: had the command got as far as loading it, the error would say so
    argv = [
        command,
        "--top_pct",
        "0",
        "--model",
        str(tmp_path / "no-model"),
        "--output_dir",
        str(tmp_path / "o"),
    ]
    if command == "study":
        argv += ["--gsm8k_dir", str(tmp_path)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert (
        f"aletheia-lora {command}: error: top_pct=0.0; it must be a percentage in (0, 100], e.g. 50." in err
    )
    assert "no-model" not in err
    assert not (tmp_path / "o").exists()
