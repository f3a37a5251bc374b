"""The jobs behind the CLI, callable from Python: ``probe_job``, ``train_job``.

Each takes plain dataclasses (the same ones the CLI parses), does the work, writes its files
atomically into the output directory, and returns a summary dict. Nothing here prints unless
asked to, and nothing imports the CLI.

Under ``torchrun`` / ``accelerate launch`` every rank runs the job (the probe splits its batches
across ranks, the Trainer runs DDP), but only the main process writes files and logs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainerState, TrainingArguments

from . import __version__
from .data import (
    DataCollator,
    MissingSplitError,
    detect_format,
    load_data,
    tokenize_dataset,
    train_eval_split,
)
from .evaluation import exact_match, mean_loss
from .io import _umask, atomic_write_text
from .models import load_model
from .probe import agree_across_ranks
from .scores import LayerScores
from .training import (
    AletheiaConfig,
    AletheiaPlan,
    NonFiniteGuard,
    TruncatedBackwardCallback,
    prepare_model,
    probe_and_select,
    wrap_with_plan,
)

PLAN_FILE = "aletheia.json"


@dataclass
class ModelArguments:
    model: str | None = field(
        default=None,
        metadata={"help": "Hub id, local folder, or empty for the embedded SmolLM2-135M-Instruct."},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the hub."})
    dtype: str | None = field(
        default=None,
        metadata={
            "help": "Weight dtype to load: auto, bfloat16, float16 or float32 (default: the checkpoint's)."
        },
    )


@dataclass
class DataArguments:
    data: str | None = field(
        default=None,
        metadata={
            "help": "A .jsonl/.json/.csv/.parquet file, a datasets.save_to_disk folder, a hub dataset, or "
            "empty for the embedded arithmetic task."
        },
    )
    format: str | None = field(
        default=None,
        metadata={
            "help": "Row format: text, prompt_completion, question_answer, messages, alpaca (default: detect)."
        },
    )
    max_length: int = field(default=256, metadata={"help": "Truncate examples to this many tokens."})
    completion_only_loss: bool = field(
        default=True, metadata={"help": "Loss on completions only for the paired formats."}
    )
    eval_fraction: float = field(
        default=0.05, metadata={"help": "Held-out fraction when the data has no test split."}
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use at most this many training rows."}
    )
    max_eval_samples: int | None = field(
        default=200, metadata={"help": "Evaluate on at most this many rows."}
    )
    eval_generate: int = field(
        default=50,
        metadata={
            "help": "Held-out questions to answer by greedy decoding for exact match (question/answer data)."
        },
    )


@dataclass
class RunArguments:
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow writing into a non-empty output directory."}
    )
    quiet: bool = field(default=False, metadata={"help": "No progress bars or summaries."})
    merge: bool = field(default=False, metadata={"help": "Also save the merged model to OUTPUT_DIR/merged."})
    skip_nonfinite_steps: bool = field(
        default=False,
        metadata={
            "help": "Skip optimizer steps with a NaN/inf gradient instead of stopping (default: stop)."
        },
    )


@dataclass
class TrainArguments(TrainingArguments):
    """transformers.TrainingArguments with defaults suited to LoRA fine-tuning."""

    output_dir: str | None = field(default=None, metadata={"help": "Where the adapter and reports go."})
    learning_rate: float = field(default=2e-4, metadata={"help": "AdamW learning rate."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Batch size per device."})
    logging_steps: float = field(default=5, metadata={"help": "Log every N steps."})
    save_steps: float = field(default=50, metadata={"help": "Checkpoint every N steps."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Keep at most this many checkpoints."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep tokenized columns."})
    dataloader_pin_memory: bool = field(
        default=torch.cuda.is_available(),
        metadata={"help": "Pin batches in memory (useful with a GPU only)."},
    )


def check_output_dir(
    path: str | os.PathLike, *, overwrite: bool, resuming: bool = False, create: bool = True
) -> Path:
    """Refuse a non-empty output directory unless ``overwrite`` (or resuming into it).

    ``create=False`` only checks, so a run that fails before writing leaves nothing behind.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output_dir {str(out)!r} is a file; pass a directory path.")
    if out.is_dir() and any(out.iterdir()) and not (overwrite or resuming):
        raise FileExistsError(
            f"output_dir {str(out)!r} is not empty; pass --overwrite_output_dir to write into it, "
            f"--resume_from_checkpoint to continue the run there, or choose another directory."
        )
    if create:
        out.mkdir(parents=True, exist_ok=True)
    return out


def versions() -> dict[str, str]:
    import peft
    import transformers

    return {
        "aletheia_lora": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "platform": platform.platform(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }


def _load_rows(data: DataArguments, seed: int) -> tuple[list[dict], list[dict]]:
    """Training and held-out rows, reading no more of the data than the sample limits need."""
    try:
        held_out = load_data(data.data, split="test", max_rows=data.max_eval_samples)
        train = load_data(data.data, split="train", max_rows=data.max_train_samples)
    except MissingSplitError:  # a single set of rows: hold some out (from a large enough head of it)
        cap = None
        if data.max_train_samples is not None:
            cap = math.ceil(data.max_train_samples / (1 - data.eval_fraction)) + 2
        train = load_data(data.data, split="train", max_rows=cap)
        train, held_out = train_eval_split(train, data.eval_fraction, seed=seed)
        train, held_out = train[: data.max_train_samples], held_out[: data.max_eval_samples]
    return list(train), list(held_out)


def _prepare_data(data: DataArguments, tokenizer, seed: int):
    train_rows, eval_rows = _load_rows(data, seed)
    fmt = data.format or detect_format(train_rows[0].keys())
    tok = dict(format=fmt, max_length=data.max_length, completion_only_loss=data.completion_only_loss)
    return (
        train_rows,
        eval_rows,
        fmt,
        tokenize_dataset(train_rows, tokenizer, **tok),
        tokenize_dataset(eval_rows, tokenizer, **tok),
    )


def _metrics(model, tokenizer, eval_rows, eval_tok, fmt: str, data: DataArguments) -> dict[str, Any]:
    out: dict[str, Any] = {"eval_loss": mean_loss(model, eval_tok, pad_token_id=tokenizer.pad_token_id)}
    if fmt == "question_answer" and data.eval_generate > 0:
        em = exact_match(model, tokenizer, eval_rows[: data.eval_generate])
        out["exact_match"] = em["exact_match"]
        out["exact_match_n"] = em["n"]
        out["examples"] = em["examples"]
    return out


class StepTimer(TrainerCallback):
    """Wall-clock seconds of each optimizer step (forward, backward, update)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - self._start)


def save_adapter(peft_model, output_dir: Path) -> None:
    """``save_pretrained`` into a temp folder, then move each file into place atomically."""
    tmp = Path(tempfile.mkdtemp(prefix=".adapter-", dir=output_dir))
    try:
        peft_model.save_pretrained(tmp, safe_serialization=True)
        mode = 0o666 & ~_umask()
        for item in tmp.iterdir():
            os.chmod(item, mode)
            os.replace(item, output_dir / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """``checkpoint-N`` folders whose save finished (Trainer writes trainer_state.json last), oldest first."""
    found = [p for p in output_dir.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return sorted(
        found, key=lambda p: int(p.name.rsplit("-", 1)[-1]) if p.name.rsplit("-", 1)[-1].isdigit() else -1
    )


def _resolve_resume(value: str | None, output_dir: Path) -> str | None:
    if value in (None, "", "false", "False"):
        return None
    if value in ("true", "True"):
        checkpoints = complete_checkpoints(output_dir)
        if not checkpoints:
            raise FileNotFoundError(
                f"--resume_from_checkpoint true: no complete checkpoint-* folder in {str(output_dir)!r}."
            )
        return str(checkpoints[-1])
    if not (Path(value) / "trainer_state.json").is_file():
        raise FileNotFoundError(
            f"--resume_from_checkpoint {value!r} is not a complete checkpoint folder (no trainer_state.json)."
        )
    return value


@contextlib.contextmanager
def _whole_model_under_zero3():
    """Load the model unpartitioned even under a ZeRO-3 launch.

    Under ZeRO-3, TrainingArguments makes transformers build every model inside
    ``deepspeed.zero.Init`` (empty, partitioned weights that only work once
    ``deepspeed.initialize`` wraps them). The probe runs before that, so each rank loads the
    whole model; the Trainer partitions it when it wraps it.
    """
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:  # pragma: no cover - transformers without the integration
        yield
        return
    config = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if config is not None and config() is not None:
            hf_deepspeed.set_hf_deepspeed_config(config())


def _is_main_process(training_args: TrainingArguments | None = None) -> bool:
    """Rank 0, or no distributed launch. Sets up ``torch.distributed`` under torchrun/accelerate."""
    if training_args is not None:  # the Trainer's own device setup (honours --use_cpu, --ddp_backend)
        return training_args.process_index == 0
    from accelerate import PartialState

    return PartialState().is_main_process


def probe_job(
    model_args: ModelArguments,
    data_args: DataArguments,
    config: AletheiaConfig,
    output_dir: str,
    *,
    overwrite_output_dir: bool = False,
    quiet: bool = False,
) -> dict[str, Any]:
    """Probe and select; write ``layer_scores.json`` and ``layer_scores.png`` to ``output_dir``."""
    from .report import plot_layer_scores, terminal_bar_chart

    out = check_output_dir(output_dir, overwrite=overwrite_output_dir, create=False)
    main_process = _is_main_process()
    model, tokenizer = load_model(
        model_args.model, dtype=model_args.dtype, trust_remote_code=model_args.trust_remote_code
    )
    if torch.cuda.is_available():
        model.to(f"cuda:{torch.cuda.current_device()}")
    _, _, _, train_tok, _ = _prepare_data(data_args, tokenizer, config.seed)
    scores, selected, _ = probe_and_select(
        model, train_tok, config, tokenizer=tokenizer, progress=not quiet and main_process
    )
    agree_across_ranks(selected, "selected layers")
    scores.meta["selected_layers"] = selected
    if main_process:
        out.mkdir(parents=True, exist_ok=True)
        scores.to_json(out / "layer_scores.json")
        plot_layer_scores(
            scores, selected, out / "layer_scores.png", title=f"{model_args.model or 'embedded'}"
        )
    return {
        "scores": scores,
        "selected_layers": selected,
        "chart": terminal_bar_chart(scores, selected),
        "files": ["layer_scores.json", "layer_scores.png"],
        "main_process": main_process,
        "output_dir": str(out),
    }


def train_job(
    model_args: ModelArguments,
    data_args: DataArguments,
    config: AletheiaConfig,
    run: RunArguments,
    training_args: TrainingArguments,
    *,
    log=print,
) -> dict[str, Any]:
    """Probe, select, train, and write the adapter, ``aletheia.json``, plots and ``report.md``."""
    from .report import plot_layer_scores, plot_loss, write_report

    resume = _resolve_resume(training_args.resume_from_checkpoint, Path(training_args.output_dir))
    # Every rank checks the folder before any rank writes: rank 0 writes only after the probe,
    # whose collectives every rank joins after its own check.
    out = check_output_dir(
        training_args.output_dir, overwrite=run.overwrite_output_dir, resuming=bool(resume), create=False
    )
    main_process = _is_main_process(training_args)
    say = log if main_process and not run.quiet else (lambda *a: None)
    with _whole_model_under_zero3():
        model, tokenizer = load_model(
            model_args.model, dtype=model_args.dtype, trust_remote_code=model_args.trust_remote_code
        )
    model.to(training_args.device)  # probe where training runs (each rank: its own device)
    train_rows, eval_rows, fmt, train_tok, eval_tok = _prepare_data(data_args, tokenizer, training_args.seed)
    say(f"data: {len(train_tok)} training / {len(eval_tok)} held-out examples, format {fmt}")

    plan_path = out / PLAN_FILE
    if resume:  # same selection as the interrupted run: read it, never re-probe
        if not plan_path.is_file():
            raise FileNotFoundError(
                f"cannot resume: {str(plan_path)!r} is missing, so the selection is unknown."
            )
        saved = json.loads(plan_path.read_text())
        old = AletheiaPlan.from_dict(saved["plan"])
        peft_model, plan = wrap_with_plan(model, old.scores, old.selected_layers, old.config)
        plan.probe_seconds = old.probe_seconds
        plan.predicted_speedup, plan.calibration = old.predicted_speedup, old.calibration  # not re-timed
        say(f"resuming from {resume} with the saved selection {plan.selected_layers}")
    else:
        if config.calibrate_cost:  # time calibration steps at the training shape
            config = dataclasses.replace(
                config,
                calibrate_batch_size=config.calibrate_batch_size or training_args.per_device_train_batch_size,
                calibrate_seq_len=config.calibrate_seq_len or data_args.max_length,
            )
            say(f"calibrating the cost model: 3 selections x a few steps of {config.calibrate_batch_size} x "
                f"{config.calibrate_seq_len} tokens ...")  # fmt: skip
        peft_model, plan = prepare_model(
            model, train_tok, config, tokenizer=tokenizer, progress=not run.quiet and main_process
        )
        say(
            f"probe: {plan.probe_seconds:.1f} s; adapting layers {plan.selected_layers} of {plan.num_layers} "
            f"({plan.trainable_params:,} trainable parameters, {plan.trainable_fraction:.0%} of all-layer LoRA)"
        )

    record: dict[str, Any] = {
        "plan": plan.to_dict(),
        "settings": {
            "model": dataclasses.asdict(model_args),
            "data": dataclasses.asdict(data_args) | {"format": fmt},
            "aletheia": plan.config.to_dict(),
            "run": dataclasses.asdict(run),
            "training": json.loads(training_args.to_json_string()),
        },
        "seed": training_args.seed,
        "versions": versions(),
        "command": sys.argv,
    }
    agree_across_ranks(plan.selected_layers, "selected layers")
    if main_process:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(plan_path, json.dumps(record, indent=1) + "\n")

    # Evaluation runs on every rank (no collectives inside, so no rank waits on another).
    say("evaluating before training ...")
    before = _metrics(peft_model, tokenizer, eval_rows, eval_tok, fmt, data_args)
    timer = StepTimer()
    guard = NonFiniteGuard(skip=run.skip_nonfinite_steps)
    trainer = Trainer(
        model=peft_model,
        args=training_args,
        train_dataset=train_tok,
        data_collator=DataCollator(tokenizer.pad_token_id),
        callbacks=[timer, TruncatedBackwardCallback(), guard],
    )
    done = TrainerState.load_from_json(str(Path(resume) / "trainer_state.json")) if resume else None
    try:
        if done is not None and 0 < training_args.max_steps <= done.global_step:
            # Trainer would run one more step; the checkpoint already is the finished run
            set_peft_model_state_dict(peft_model, load_file(str(Path(resume) / "adapter_model.safetensors")))
            trainer.state = done
            say(f"{resume} already reached max_steps={training_args.max_steps}; nothing left to train")
            run_mean_loss = None
        else:
            run_mean_loss = trainer.train(resume_from_checkpoint=resume).training_loss
    except KeyboardInterrupt:
        last = complete_checkpoints(out)
        hint = (
            f" The last checkpoint is {last[-1]}; continue with --resume_from_checkpoint true."
            if last
            else ""
        )
        raise KeyboardInterrupt(f"training interrupted.{hint}") from None
    after = _metrics(peft_model, tokenizer, eval_rows, eval_tok, fmt, data_args)

    files = [
        "adapter_model.safetensors",
        "adapter_config.json",
        PLAN_FILE,
        "layer_scores.png",
        "loss.png",
        "report.md",
    ]
    if main_process:  # the other ranks trained the same adapter; one copy is written
        save_adapter(peft_model, out)
    if run.merge and main_process:
        merged = peft_model.merge_and_unload()
        merged.save_pretrained(out / "merged", safe_serialization=True)
        tokenizer.save_pretrained(out / "merged")
        files.append("merged/")

    history = trainer.state.log_history
    train_losses = [h["loss"] for h in history if "loss" in h]
    steady = timer.seconds[1:] or timer.seconds  # the first step pays for warm-up
    record.update(
        {
            "train_seconds_per_step": statistics.median(steady) if steady else None,
            "train_steps": trainer.state.global_step,
            "train_seconds": sum(timer.seconds),
            "final_train_loss": train_losses[-1] if train_losses else run_mean_loss,
            "mean_train_loss": run_mean_loss,
            "skipped_nonfinite_steps": guard.skipped,
            "metrics_before": before,
            "metrics_after": after,
            "log_history": history,
        }
    )
    if main_process:
        atomic_write_text(plan_path, json.dumps(record, indent=1, default=str) + "\n")
        plot_layer_scores(
            plan.scores, plan.selected_layers, out / "layer_scores.png", title=model_args.model or "embedded"
        )
        plot_loss(history, out / "loss.png")
        numeric = ("eval_loss", "exact_match")
        write_report(
            out / "report.md",
            {
                "model": model_args.model or "embedded SmolLM2-135M-Instruct",
                "data": data_args.data or "embedded arithmetic task",
                "num_layers": plan.num_layers,
                "selected_layers": plan.selected_layers,
                "scores": dict(plan.scores),
                "probe_seconds": plan.probe_seconds,
                "probe": plan.scores.meta,
                "trainable_params": plan.trainable_params,
                "all_layer_trainable_params": plan.all_layer_trainable_params,
                "predicted_speedup": plan.predicted_speedup,
                "calibration": plan.calibration,
                "train_seconds_per_step": record["train_seconds_per_step"],
                "steps": trainer.state.global_step,
                "final_train_loss": record["final_train_loss"],
                "final_eval_loss": after["eval_loss"],
                "metric_before": {k: before[k] for k in numeric if k in before},
                "metric_after": {k: after[k] for k in numeric if k in after},
                "settings": plan.config.to_dict(),
                "versions": record["versions"],
                "files": files,
            },
        )
    return record | {
        "output_dir": str(out),
        "files": files,
        "plan_object": plan,
        "scores": plan.scores,
        "main_process": main_process,
    }


def load_plan(output_dir: str | os.PathLike) -> AletheiaPlan:
    """The plan a finished (or interrupted) ``train_job`` wrote to ``output_dir``."""
    data = json.loads((Path(output_dir) / PLAN_FILE).read_text())
    return AletheiaPlan.from_dict(data["plan"])


__all__ = [
    "DataArguments",
    "LayerScores",
    "ModelArguments",
    "RunArguments",
    "TrainArguments",
    "check_output_dir",
    "load_plan",
    "probe_job",
    "train_job",
]
