"""`aletheia-lora` command line: parse arguments, call the library, print. Nothing else.

    aletheia-lora probe --model M --data D --output_dir O [--probe_batches 5 ...] [--export peft|axolotl|llama-factory]
    aletheia-lora train --model M --data D --output_dir O [--top_pct 50] [any TrainingArguments]
    aletheia-lora demo  [--output_dir O] [--max_steps N]
    aletheia-lora bench [--random_init PRESET | --model M] [--gradient_checkpointing both] ...
    aletheia-lora eval  [--model M] [--adapter DIR] --output_dir O [--suites task,general_text,...]
    aletheia-lora study --gsm8k_dir D --output_dir O [--mmlu_dir M] [--arms ...] [--steps 48]
    aletheia-lora race  --gsm8k_dir D --output_dir O [--arms lora-all top freeze drop@1.3x ...] [--seeds 0 1 2]

Every field of AletheiaConfig and transformers.TrainingArguments is a flag; ``--config FILE``
(YAML or JSON) supplies defaults that explicit flags override.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
import typing
import warnings
from dataclasses import field
from pathlib import Path

USAGE = """usage: aletheia-lora {probe,train,demo,bench,eval,study,oracle,race} [--help] [options]

  probe   score every layer on your data; write layer_scores.json/.png
  train   probe, select, fine-tune with LoRA on the selected layers; write the adapter and a report
  demo    train on the embedded default model and task, and show the before/after metric
  bench   time all-layer LoRA against the layer selections side by side; write bench.json/.md/.png
  eval    score a model (+ adapter) on the task and on forgetting suites; write eval.json/.md
  study   fine-tune once per layer selection (all, top, random, last, ...) and compare quality,
          forgetting and speed; write study.json/.md/.png
  oracle  fine-tune every block alone, measure its held-out loss drop, and rank the probe's
          signals against it; write oracle.json/.md/.png
  race    train every arm (all-layer LoRA, static picks, freezing, backward dropping) side by side
          and measure each one's time to all-layer LoRA's final held-out loss; write summary.json/.md/.png
"""


def _without(cls, *names: str):
    """A copy of dataclass ``cls`` minus some fields (so two dataclasses never share a flag)."""
    hints = typing.get_type_hints(cls)
    fields = []
    for f in dataclasses.fields(cls):
        if f.name in names:
            continue
        kwargs = {"metadata": f.metadata}
        if f.default is not dataclasses.MISSING:
            kwargs["default"] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            kwargs["default_factory"] = f.default_factory
        fields.append((f.name, hints[f.name], field(**kwargs)))
    return dataclasses.make_dataclass(f"{cls.__name__}Flags", fields)


# Flags that grant a permission: a config file (perhaps someone else's) cannot turn them on;
# they must be typed on the command line.
PERMISSIONS = ("trust_remote_code", "overwrite_output_dir", "allow_code_execution")


def _config_file_args(argv: list[str]) -> list[str]:
    """Expand ``--config FILE`` into flags placed first, so explicit flags win."""
    argv = [part for arg in argv for part in (arg.split("=", 1) if arg.startswith("--config=") else [arg])]
    if "--config" not in argv:
        return argv
    i = argv.index("--config")
    if i + 1 >= len(argv):
        raise SystemExit("--config needs a file path (YAML or JSON).")
    path = Path(argv[i + 1])
    if not path.is_file():
        raise SystemExit(f"--config {str(path)!r}: no such file.")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        values = yaml.safe_load(text) or {}
    else:
        values = json.loads(text)
    if not isinstance(values, dict):
        raise SystemExit(f"--config {str(path)!r} must hold a mapping of flag names to values.")
    granted = [k for k in PERMISSIONS if values.get(k) not in (None, False, "false", "False", 0)]
    if granted:
        raise SystemExit(
            f"--config {str(path)!r} sets {', '.join(f'{k}: {values[k]}' for k in granted)}; a config file "
            f"cannot grant permissions. Pass {' '.join(f'--{k} true' for k in granted)} on the command line."
        )
    flags: list[str] = []
    for key, value in values.items():
        if isinstance(value, list):
            flags += [f"--{key}", *map(str, value)]
        else:
            flags += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return flags + argv[:i] + argv[i + 2 :]


# Headings of the argument groups in --help, by settings class; the TrainingArguments pass-through last.
GROUPS = {
    "ModelSettings": "model",
    "DataSettings": "data",
    "AletheiaConfigFlags": "probe, selection and LoRA",
    "AletheiaConfig": "probe, selection and LoRA",
    "RunSettings": "output",
    "OutputDirSettings": "output",
    "ExportSettings": "output",
    "BenchArguments": "bench",
    "StudyArguments": "study",
    "EvalArguments": "eval",
    "OracleArguments": "oracle",
    "RaceArguments": "race",
}
TRAINING_ARGUMENTS_GROUP = (
    "transformers.TrainingArguments (passed through to the Trainer; every field is a flag: "
    "https://huggingface.co/docs/transformers/main_classes/trainer#transformers.TrainingArguments)"
)


def _help_formatter():
    import argparse

    class Formatter(argparse.HelpFormatter):
        """One line of help a flag, its default once (never after a help text that names its own)."""

        def _get_help_string(self, action):
            text = action.help or ""
            if (
                "default" in text
                or action.default in (None, argparse.SUPPRESS)
                or action.option_strings[0].startswith("--no_")
            ):
                return text
            return f"{text} (default: %(default)s)"

    return Formatter


def _parser(types, prog: str):
    """``HfArgumentParser`` over ``types``: a short usage line, each settings class under its heading
    (the project's own flags first, TrainingArguments last), ``--no_X`` flags described as what they do."""
    from transformers import HfArgumentParser, TrainingArguments

    for cls in types:  # HfArgumentParser puts a class with _argument_group_name under that heading
        if issubclass(cls, TrainingArguments):
            cls._argument_group_name = TRAINING_ARGUMENTS_GROUP
        elif cls.__name__ in GROUPS:
            cls._argument_group_name = GROUPS[cls.__name__]
    parser = HfArgumentParser(
        types,
        prog=prog,
        usage=f"{prog} [--flag VALUE ...] [--config FILE.yaml]   (--help lists every flag by group)",
        formatter_class=_help_formatter(),
    )
    for action in parser._actions:  # argparse has no public API to edit an added argument's help
        name = action.option_strings[0] if action.option_strings else ""
        if name.startswith("--no_"):
            action.help = f"Turn off --{name[5:]} (same as --{name[5:]} false)."
    return parser


def _parse(types, argv: list[str], prog: str):
    parser = _parser(types, prog)
    try:
        return parser.parse_args_into_dataclasses(args=_config_file_args(argv))
    except ValueError as err:  # "Some specified arguments are not used by the HfArgumentParser"
        if "not used" not in str(err):
            raise
        parser.print_usage(sys.stderr)
        print(f"{prog}: error: {err}; see {prog} --help", file=sys.stderr)
        raise SystemExit(2) from None


def _aletheia_config(flags, seed: int):
    from .settings import AletheiaConfig

    return AletheiaConfig(**dataclasses.asdict(flags), seed=seed)


def probe(argv: list[str]) -> int:
    from .settings import AletheiaConfig, DataSettings, ExportSettings, ModelSettings, OutputDirSettings
    from .train import probe_job

    model_args, data_args, config, out, exporting = _parse(
        (ModelSettings, DataSettings, AletheiaConfig, OutputDirSettings, ExportSettings),
        argv,
        "aletheia-lora probe",
    )
    result = probe_job(
        model_args,
        data_args,
        config,
        out.output_dir,
        overwrite_output_dir=out.overwrite_output_dir,
        quiet=out.quiet,
        export=exporting.export,
    )
    if not out.quiet and result["main_process"]:
        print(result["chart"])
        print(f"wrote {', '.join(result['files'])} to {result['output_dir']}")
    if result["export_path"] and result["main_process"]:  # the one line a script needs, even with --quiet
        print(f"{exporting.export} config: {result['export_path']}")
    return 0


def _train_types():
    from .settings import AletheiaConfig, DataSettings, ModelSettings, RunSettings
    from .train import TrainArguments

    # the seed is TrainingArguments' --seed, which the probe and the LoRA init share
    return (ModelSettings, DataSettings, _without(AletheiaConfig, "seed"), RunSettings, TrainArguments)


def _run_training(model_args, data_args, flags, run, training_args) -> dict:
    from transformers.utils import logging as hf_logging

    from .train import train_job

    if run.quiet:
        training_args.disable_tqdm = True
        hf_logging.set_verbosity_error()
    return train_job(model_args, data_args, _aletheia_config(flags, training_args.seed), run, training_args)


def train(argv: list[str]) -> int:
    model_args, data_args, flags, run, training_args = _parse(_train_types(), argv, "aletheia-lora train")
    if training_args.output_dir is None:
        raise SystemExit("aletheia-lora train: --output_dir is required (where the adapter and report go).")
    result = _run_training(model_args, data_args, flags, run, training_args)
    if not run.quiet and result["main_process"]:  # under torchrun every rank gets here
        _print_summary(result)
    return 0


# The demo's defaults: a few dozen steps that finish in minutes on 2 CPU cores.
DEMO_DEFAULTS = ["--max_steps", "60", "--learning_rate", "1e-3", "--max_length", "96", "--eval_generate", "40",
                 "--max_eval_samples", "100", "--save_steps", "30", "--logging_steps", "5",
                 "--per_device_train_batch_size", "8"]  # fmt: skip


def demo(argv: list[str]) -> int:
    argv = DEMO_DEFAULTS + argv
    if "--output_dir" not in argv:
        argv += ["--output_dir", f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}"]
    model_args, data_args, flags, run, training_args = _parse(_train_types(), argv, "aletheia-lora demo")
    if not run.quiet:
        print(
            "aletheia-lora demo: SmolLM2-135M-Instruct (embedded) on the embedded arithmetic task.\n"
            "probe -> select the top layers -> LoRA on them -> train -> compare the held-out metric.\n"
        )
    result = _run_training(model_args, data_args, flags, run, training_args)
    if not run.quiet and result["main_process"]:  # under torchrun every rank gets here
        _print_summary(result)
    return 0


def _print_summary(result: dict) -> None:
    from .report import checkpoints_text, exact_match_note, speed_line, terminal_bar_chart

    plan = result["plan_object"]
    print()
    print(terminal_bar_chart(plan.scores, plan.selected_layers))
    print()
    print(
        f"trainable parameters: {plan.trainable_params:,} "
        f"({plan.trainable_fraction:.0%} of all-layer LoRA's {plan.all_layer_trainable_params:,})"
    )
    speed = speed_line(plan.predicted_speedup, plan.calibration, result.get("train_seconds_per_step"),
                       result.get("device"))  # fmt: skip
    print(f"probe {plan.probe_seconds:.1f} s; {result['train_steps']} steps; {speed}")
    before, after = result["metrics_before"], result["metrics_after"]
    for key in ("eval_loss", "exact_match"):
        if key in before:
            print(f"held-out {key}: {before[key]:.4f} -> {after[key]:.4f}")
    note = exact_match_note(after)
    if note:
        print(f"  ({note})")
    for ex in after.get("examples", [])[:2]:
        print(
            f"  Q: {ex['question']}\n  A: {ex['output']!r} (gold {ex['gold']}, {'ok' if ex['correct'] else 'wrong'})"
        )
    print(f"\nwrote {', '.join(result['files'])} to {result['output_dir']}")
    if result.get("hub_commit_url"):
        print(f"pushed to the Hub: {result['hub_commit_url']}")
    if result.get("checkpoints"):
        print(
            f"kept {checkpoints_text(result['checkpoints'])} to resume from (--save_total_limit sets how many)"
        )


def _report_command(name: str, types, runner, argv: list[str]) -> int:
    """Parse ``types``, run ``runner`` with progress on stderr, print its table and where files went."""
    (args,) = _parse((types,), argv, f"aletheia-lora {name}")
    result = runner(
        args,
        log=lambda line: print(line, file=sys.stderr, flush=True),
        command=["aletheia-lora", name, *argv],
    )
    print(result["table"])
    if not args.quiet:
        print(f"\nwrote {', '.join(result['files'])} to {result['output_dir']}")
    return 0


def bench(argv: list[str]) -> int:
    from .bench import BenchArguments, run_bench

    return _report_command("bench", BenchArguments, run_bench, argv)


def evaluate(argv: list[str]) -> int:
    from .eval import EvalArguments, eval_job

    (args,) = _parse((EvalArguments,), argv, "aletheia-lora eval")
    settings = dataclasses.asdict(args)
    quiet = settings.pop("quiet")
    log = None if quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    result = eval_job(**settings, log=log)
    if not quiet:
        print(result["table"])
        print(f"wrote {', '.join(result['files'])} to {result['output_dir']}")
    return 0


def study(argv: list[str]) -> int:
    from .study import StudyArguments, run_study

    return _report_command("study", StudyArguments, run_study, argv)


def race(argv: list[str]) -> int:
    from .race import RaceArguments, run_race

    return _report_command("race", RaceArguments, run_race, argv)


def oracle(argv: list[str]) -> int:
    from .oracle import OracleArguments, run_oracle

    return _report_command("oracle", OracleArguments, run_oracle, argv)


COMMANDS = {
    "probe": probe,
    "train": train,
    "demo": demo,
    "bench": bench,
    "eval": evaluate,
    "study": study,
    "oracle": oracle,
    "race": race,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # PEFT still calls this transformers property; the warning is not actionable for our users
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    # DeepSpeed, when installed, is imported by transformers and announces "Setting accelerator to CPU"
    # on machines without a GPU; not actionable for our users (its own messages otherwise pass)
    logging.getLogger("DeepSpeed").addFilter(
        lambda record: "Setting accelerator to" not in record.getMessage()
    )
    # bitsandbytes (installed with the qlora extra, imported by PEFT) looks for an optional CPU kernel on the Hub
    # when it loads and, offline, says it fell back to its own; not actionable either
    for name in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"):
        logging.getLogger(name).addFilter(lambda record: "kernels-community" not in record.getMessage())
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(USAGE, file=sys.stdout if argv and argv[0] in ("-h", "--help") else sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    except (
        ValueError,
        FileNotFoundError,
        FileExistsError,
        OSError,
        ImportError,
        FloatingPointError,
    ) as err:
        print(f"aletheia-lora {argv[0]}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        print(f"\naletheia-lora {argv[0]}: {err or 'interrupted'}", file=sys.stderr)
        return 130
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """Under torchrun / accelerate launch, end the process group the run joined, so that no rank
    aborts in torch's C++ destructors at interpreter exit after its work is written."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
