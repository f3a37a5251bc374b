"""``probe`` and ``train``: the jobs behind the two main commands, callable from Python.

Each takes the settings dataclasses the CLI parses, does the work, writes its files atomically
into the output directory, and returns a summary dict. Nothing here prints unless asked to, and
nothing imports the CLI.

Under ``torchrun`` / ``accelerate launch`` every rank runs the job (the probe splits its batches
across ranks, the Trainer runs DDP), but only the main process writes files and logs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import Trainer, TrainerState, TrainingArguments
from transformers.trainer_utils import sort_checkpoints

from .callbacks import NonFiniteGuard, StepTimer, plan_to_tensorboard
from .card import CARD_FILE, write_card
from .data import DataCollator, PreparedData, prepare_data
from .evaluation import ProgressLog, evaluate_task
from .export import EXPORT_FILES, check_format
from .hub import prepare_hub_repo, push_folder
from .io import atomic_write_text
from .models import base_model_reference, load_model
from .plan import AletheiaPlan, plan_for, planned_cost, prepare_model, probe_and_select, wrap_with_plan
from .probe import agree_across_ranks
from .report import exact_match_note, plot_layer_scores, plot_loss, terminal_bar_chart, write_report
from .runs import PLAN_FILE, check_output_dir, default_output_dir, save_adapter, versions
from .schedules import (
    DropSchedule,
    FreezeSchedule,
    Schedule,
    ScheduleCallback,
    checkpoint_schedule_state,
    drop_rates,
)
from .settings import AletheiaConfig, DataSettings, ModelSettings, RunSettings, ScheduleSettings
from .truncation import TruncatedBackwardCallback


@dataclass
class TrainArguments(TrainingArguments):
    """transformers.TrainingArguments with defaults suited to LoRA fine-tuning."""

    output_dir: str | None = field(default=None, metadata={"help": "Where the adapter and reports go."})
    learning_rate: float = field(default=2e-4, metadata={"help": "AdamW learning rate."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Batch size per device."})
    logging_steps: float = field(default=5, metadata={"help": "Log every N steps."})
    save_steps: float = field(default=50, metadata={"help": "Checkpoint every N steps."})
    save_total_limit: int | None = field(
        default=1,
        metadata={
            "help": "Keep at most this many checkpoint-N folders (default 1: the last one, to resume from)."
        },
    )
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep tokenized columns."})
    dataloader_pin_memory: bool = field(
        default=torch.cuda.is_available(),
        metadata={"help": "Pin batches in memory (useful with a GPU only)."},
    )


SMALL_HELD_OUT = 20  # fewer held-out rows than this: the before/after numbers say little


def _metrics(
    model, tokenizer, data: PreparedData, eval_generate: int, say=None, progress_every: float = 10.0
) -> dict[str, Any]:
    """The held-out evaluation, the same as ``eval``'s task suite (``evaluation.evaluate_task``); ``say``
    (None: silent) gets a progress line at most every ``progress_every`` seconds."""
    progress = ProgressLog(say, "", progress_every, {}, "").suite("held-out") if say else None
    out = evaluate_task(
        model, tokenizer, data.eval_rows, tokenized=data.eval, generate=eval_generate, progress=progress
    )
    out["eval_loss"] = out.pop("loss")
    return out


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """``checkpoint-N`` folders whose save finished, oldest first.

    transformers' ``get_last_checkpoint`` takes the newest folder even when a kill interrupted its
    save; the Trainer writes ``trainer_state.json`` last, so a folder with it is complete.
    """
    if not output_dir.is_dir():
        return []
    found = [Path(p) for p in sort_checkpoints(str(output_dir))]
    return [p for p in found if (p / "trainer_state.json").is_file()]


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
    model_args: ModelSettings,
    data_args: DataSettings,
    config: AletheiaConfig,
    output_dir: str | None = None,
    *,
    overwrite_output_dir: bool = False,
    quiet: bool = False,
    export: str | None = None,
) -> dict[str, Any]:
    """Probe and select; write ``layer_scores.json`` and ``layer_scores.png`` to ``output_dir``
    (default ``runs/probe-<date>-<time>``), and with ``export`` the selection as that trainer's
    config (``peft``: adapter_config.json, ``axolotl``: axolotl.yaml, ``llama-factory``:
    llama_factory.yaml; see :mod:`aletheia_lora.export`)."""
    if export is not None:
        check_format(export)
    out = check_output_dir(
        output_dir or default_output_dir("probe"), overwrite=overwrite_output_dir, create=False
    )
    main_process = _is_main_process()
    model, tokenizer = load_model(
        model_args.model,
        dtype=model_args.torch_dtype_name,
        trust_remote_code=model_args.trust_remote_code,
        **model_args.quantization_kwargs(),
    )
    if torch.cuda.is_available():
        model.to(f"cuda:{torch.cuda.current_device()}")
    data = prepare_data(data_args, tokenizer, config.seed)
    scores, selected, probe_seconds = probe_and_select(
        model, data.train, config, tokenizer=tokenizer, progress=not quiet and main_process
    )
    agree_across_ranks(selected, "selected layers")
    scores.meta["selected_layers"] = selected
    files = ["layer_scores.json", "layer_scores.png"]
    exported = None
    if export is not None:
        plan = plan_for(model, scores, selected, config, probe_seconds=probe_seconds)
        plan.base_model = base_model_reference(model_args.model)["name"]
        exported = (EXPORT_FILES[export], plan.export(export))
        files.append(exported[0])
    if main_process:
        out.mkdir(parents=True, exist_ok=True)
        scores.to_json(out / "layer_scores.json")
        plot_layer_scores(
            scores, selected, out / "layer_scores.png", title=f"{model_args.model or 'embedded'}"
        )
        if exported is not None:
            atomic_write_text(out / exported[0], exported[1])
    return {
        "scores": scores,
        "selected_layers": selected,
        "chart": terminal_bar_chart(scores, selected),
        "files": files,
        "export_path": str(out / exported[0]) if exported else None,
        "main_process": main_process,
        "output_dir": str(out),
    }


def train_job(
    model_args: ModelSettings,
    data_args: DataSettings,
    config: AletheiaConfig,
    run: RunSettings,
    training_args: TrainingArguments,
    *,
    log=print,
) -> dict[str, Any]:
    """Probe, select, train, and write the adapter, its model card ``README.md``, ``aletheia.json``, plots
    and ``report.md``; with ``push_to_hub``, check the Hub repo first and upload the folder at the end."""
    resume = _resolve_resume(training_args.resume_from_checkpoint, Path(training_args.output_dir))
    # Every rank checks the folder before any rank writes: rank 0 writes only after the probe,
    # whose collectives every rank joins after its own check.
    out = check_output_dir(
        training_args.output_dir, overwrite=run.overwrite_output_dir, resuming=bool(resume), create=False
    )
    main_process = _is_main_process(training_args)
    loud = log if main_process and not run.quiet else None  # progress lines go to log
    say = loud or (lambda *a: None)
    hub_repo = None
    if training_args.push_to_hub:  # fail here, in seconds, rather than after the probe and the training
        hub_repo = prepare_hub_repo(training_args.hub_model_id, out, token=training_args.hub_token,
                                    private=training_args.hub_private_repo)  # fmt: skip
        # the finished folder is uploaded below; the Trainer's own pushes would replace the card with its own
        training_args.push_to_hub = False
        say(f"will push the adapter to {hub_repo} when the run ends")
    with _whole_model_under_zero3():
        model, tokenizer = load_model(
            model_args.model,
            dtype=model_args.torch_dtype_name,
            trust_remote_code=model_args.trust_remote_code,
            **model_args.quantization_kwargs(),
        )
    model.to(training_args.device)  # probe where training runs (each rank: its own device)
    data = prepare_data(data_args, tokenizer, training_args.seed)
    fmt = data.format
    say(f"data: {len(data.train)} training / {len(data.eval)} held-out examples, format {fmt}")
    if len(data.eval) < SMALL_HELD_OUT:
        warnings.warn(
            f"only {len(data.eval)} held-out rows: the before/after numbers say little. Raise --eval_fraction "
            f"(now {data_args.eval_fraction}) or --max_eval_samples, or give data with a test split.",
            stacklevel=2,
        )

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
            model, data.train, config, tokenizer=tokenizer, progress=not run.quiet and main_process
        )
        say(
            f"probe: {plan.probe_seconds:.1f} s; adapting layers {plan.selected_layers} of {plan.num_layers} "
            f"({plan.trainable_params:,} trainable parameters, {plan.trainable_fraction:.0%} of all-layer LoRA)"
        )

    base_model = base_model_reference(model_args.model)  # what the adapter names as its base
    plan.base_model = base_model["name"]
    record: dict[str, Any] = {
        "base_model": base_model,
        "hub_model_id": hub_repo,
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
    generated = min(data_args.eval_generate, len(data.eval_rows)) if data.format == "question_answer" else 0
    say(f"evaluating before training: loss on {len(data.eval)} held-out rows"
        + (f", greedy answers to {generated} questions" if generated else "")
        + " (--max_eval_samples / --eval_generate change how many) ...")  # fmt: skip
    started = time.perf_counter()
    before = _metrics(peft_model, tokenizer, data, data_args.eval_generate, loud)
    eval_seconds = time.perf_counter() - started
    say(f"evaluated in {eval_seconds:.0f} s")
    timer = StepTimer()
    guard = NonFiniteGuard(skip=run.skip_nonfinite_steps)
    schedule = over_the_run(run, plan, model, training_args, data_args.max_length, resume)
    if schedule is not None:
        say(f"schedule: {run.schedule} ({_schedule_words(schedule)})")
        if training_args.ddp_find_unused_parameters is None:  # frozen or dropped blocks get no gradient
            training_args.ddp_find_unused_parameters = True
    trainer = Trainer(
        model=peft_model,
        args=training_args,
        train_dataset=data.train,
        data_collator=DataCollator(tokenizer.pad_token_id),
        callbacks=[
            timer,
            TruncatedBackwardCallback(),
            guard,
            *([ScheduleCallback(schedule)] if schedule else []),
        ],
    )
    plan_to_tensorboard(trainer, plan, timer)  # --report_to tensorboard: scores, selection, speed in the run
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
    say("evaluating after training ...")
    after = _metrics(peft_model, tokenizer, data, data_args.eval_generate, loud)

    checkpoints = [
        {"folder": p.name, "bytes": sum(f.stat().st_size for f in p.rglob("*") if f.is_file())}
        for p in complete_checkpoints(out)
    ]
    files = [
        "adapter_model.safetensors",
        "adapter_config.json",
        CARD_FILE,
        PLAN_FILE,
        "layer_scores.png",
        "loss.png",
        "report.md",
    ]
    if main_process:  # the other ranks trained the same adapter; one copy is written
        save_adapter(peft_model, out, base_model=base_model["name"])
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
            "schedule": schedule.state_dict() if schedule is not None else None,
            "metrics_before": before,
            "metrics_after": after,
            "eval_seconds": eval_seconds,
            "device": str(training_args.device),
            "checkpoints": checkpoints,
            "log_history": history,
        }
    )
    if main_process:
        atomic_write_text(plan_path, json.dumps(record, indent=1, default=str) + "\n")
        plot_layer_scores(
            plan.scores, plan.selected_layers, out / "layer_scores.png",
            title=f"{model_args.model or 'SmolLM2-135M-Instruct (embedded)'} on {data_args.data or 'the embedded task'}",
        )  # fmt: skip
        write_card(out, record, adapter=hub_repo)  # after the plot, which the card embeds
        held_out = [{"step": 0, "eval_loss": before["eval_loss"]},
                    {"step": trainer.state.global_step, "eval_loss": after["eval_loss"]}]  # fmt: skip
        plot_loss(history + held_out, out / "loss.png")
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
                "checkpoints": checkpoints,
                "device": str(training_args.device),
                "exact_match_note": exact_match_note(after),
            },
        )
    pushed = None
    if hub_repo and main_process:
        say(f"pushing {out} to {hub_repo} ...")
        pushed = push_folder(hub_repo, out, token=training_args.hub_token)
    return record | {
        "hub_commit_url": pushed,
        "output_dir": str(out),
        "files": files,
        "plan_object": plan,
        "scores": plan.scores,
        "main_process": main_process,
    }


def over_the_run(
    run: ScheduleSettings,
    plan: AletheiaPlan,
    model: torch.nn.Module,
    training_args: TrainingArguments,
    max_length: int,
    resume: str | None,
) -> Schedule | None:
    """The schedule ``--schedule`` asks for over the plan's layers (None for ``static``), with the state of the
    checkpoint it resumes from. Drop rates come from the probe's scores and the plan's cost model at the
    training batch shape (FLOPs with the H200 factors: ``drop_target_speedup`` is a prediction, not a measure)."""
    saved = checkpoint_schedule_state(resume) if resume else None
    if resume and (saved or {}).get("kind", "static") != run.schedule:
        raise ValueError(
            f"--schedule {run.schedule} but the checkpoint {resume} was trained with schedule "
            f"{(saved or {}).get('kind', 'static')}; resume with the schedule it started with."
        )
    if run.schedule == "static":
        return None
    if run.schedule == "freeze":
        schedule: Schedule = FreezeSchedule(
            interval=run.freeze_interval,
            threshold=run.freeze_threshold,
            min_steps=run.freeze_min_steps,
            max_frozen=run.freeze_max_frozen,
            layers_path=plan.config.layers_path,
        )
    else:
        cost = planned_cost(
            model, plan.config, batch_size=training_args.per_device_train_batch_size, seq_len=max_length
        )
        rates, _ = drop_rates(
            [plan.scores.get(i, 0.0) for i in range(plan.num_layers)],
            plan.selected_layers,
            cost,
            target_speedup=run.drop_target_speedup,
            max_rate=run.max_drop_rate,
        )
        schedule = DropSchedule(rates, seed=training_args.seed, layers_path=plan.config.layers_path)
    if saved:
        schedule.load_state_dict(saved)
    return schedule


def _schedule_words(schedule: Schedule) -> str:
    if isinstance(schedule, FreezeSchedule):
        return (
            f"every {schedule.interval} steps from step {schedule.min_steps}, a bottom prefix whose gradient "
            f"statistic changed by less than {schedule.threshold:.0%} stops training, up to "
            f"{schedule.max_frozen:.0%} of the adapted blocks"
        )
    active = [r for r in schedule.rates if r > 0]
    return f"each step skips a block's backward with probability {min(active):.2f}-{max(active):.2f}"


def load_plan(output_dir: str | os.PathLike) -> AletheiaPlan:
    """The plan a finished (or interrupted) ``train_job`` wrote to ``output_dir``."""
    data = json.loads((Path(output_dir) / PLAN_FILE).read_text())
    return AletheiaPlan.from_dict(data["plan"])


__all__ = ["PLAN_FILE", "TrainArguments", "complete_checkpoints", "load_plan", "probe_job", "train_job"]
