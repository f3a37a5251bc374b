"""``aletheia-lora eval``: score a model, with or without an adapter, on the task and forgetting suites.

``eval_job`` loads the model (+ adapter), runs the suites of ``suites.py`` (optionally also on
the base model, with the adapter disabled), and writes ``eval.json`` and ``eval.md``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import PeftModel

from .data import MissingSplitError, load_data, load_rows
from .io import atomic_write_text
from .models import load_model
from .report import exact_match_note, render_table
from .runs import check_output_dir, default_output_dir, read_run_record, versions
from .settings import DTYPES, DataSettings, ModelSettings, OutputDirSettings
from .suites import TaskRows, prepare_inputs, resolve_suites, run_suites, sample


@dataclass(kw_only=True)
class EvalArguments(ModelSettings, OutputDirSettings):
    """Settings of ``aletheia-lora eval``. Every field is a flag of the same name."""

    adapter: str | None = field(default=None, metadata={"help": "A PEFT adapter folder to load on top."})
    suites: list[str] = field(
        default_factory=list,
        metadata={"help": "Suites, comma- or space-separated, from task, general_text, humaneval, mmlu, gsm8k, "
                  "humaneval_exec (default: task,general_text,humaneval, plus mmlu/gsm8k when --mmlu_dir/--gsm8k "
                  "are given)."},
    )  # fmt: skip
    data: str | None = field(
        default=None,
        metadata={"help": "Task data: its test split (else every row, refused with an --adapter unless "
                  "--allow_training_rows). Omit it: the held-out rows of the adapter's run (its aletheia.json), "
                  "else the embedded task."},
    )  # fmt: skip
    allow_training_rows: bool = field(
        default=False,
        metadata={"help": "Score every row of --data when it has no test split, even rows the adapter may have "
                  "trained on."},
    )  # fmt: skip
    text: str | None = field(
        default=None, metadata={"help": "English text file for general_text (default: pydoc_data.topics)."}
    )
    mmlu_dir: str | None = field(
        default=None, metadata={"help": "Folder of MMLU CSVs (question,A,B,C,D,answer), optional dev/."}
    )
    mmlu_shots: int = field(default=0, metadata={"help": "Few-shot rows from dev/ per MMLU question."})
    gsm8k: str | None = field(default=None, metadata={"help": "GSM8K .jsonl file of {question, answer}."})
    gsm8k_generate: bool = field(
        default=False, metadata={"help": "Also greedy-decode GSM8K for exact match."}
    )
    generate: bool = field(default=True, metadata={"help": "Greedy exact match on numeric task answers."})
    limit: int | None = field(
        default=None, metadata={"help": "Items per suite: the first N after a shuffle seeded by --seed."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the --limit shuffle."})
    max_length: int = field(default=512, metadata={"help": "Tokens per example / general_text window."})
    max_new_tokens: int | None = field(
        default=None,
        metadata={"help": "Generation budget for exact match (default: from the gold answers: at least 256 "
                  "new tokens, 4x the longest answer; humaneval_exec 256). Generation stops at EOS or a complete "
                  "'#### <number>' either way; answers that hit the budget are counted."},
    )  # fmt: skip
    batch_size: int = field(default=8, metadata={"help": "Examples per forward pass."})
    lm_eval_tasks: list[str] = field(
        default_factory=list,
        metadata={"help": "lm-evaluation-harness tasks to run on the in-memory model (comma- or space-"
                  "separated; needs the lm-eval extra)."},
    )  # fmt: skip
    lm_eval_include: str | None = field(
        default=None, metadata={"help": "Folder of custom lm-eval task YAMLs (e.g. local datasets)."}
    )
    lm_eval_fewshot: int | None = field(
        default=None, metadata={"help": "Few-shot examples for the lm-eval tasks (default: each task's)."}
    )
    allow_code_execution: bool = field(
        default=False,
        metadata={"help": "Allow the humaneval_exec suite to run model-written code (separate, resource-"
                  "limited processes; not a security sandbox)."},
    )  # fmt: skip
    humaneval_samples: int = field(
        default=1, metadata={"help": "humaneval_exec: completions per problem (1: greedy, pass@1)."}
    )
    compare_base: bool = field(
        default=False, metadata={"help": "Also evaluate the base model (adapter disabled); report deltas."}
    )


def _numeric(metrics: dict) -> dict[str, float]:
    return {
        k: v
        for k, v in metrics.items()
        if k not in ("n", "tokens", "samples", "exact_match_n", "max_new_tokens")
        and isinstance(v, (int, float))
    }


def with_deltas(adapted: dict[str, dict], base: dict[str, dict]) -> dict[str, dict]:
    """Each suite's adapter metrics plus ``"base"`` (the base model's) and ``"delta"`` (adapter - base)."""
    out = {}
    for name, metrics in adapted.items():
        b = base[name]
        delta = {k: v - b[k] for k, v in _numeric(metrics).items() if k in b}
        out[name] = {**metrics, "base": b, "delta": delta}
    return out


def markdown_table(results: dict[str, dict]) -> str:
    """One row per suite and metric: value (and base, delta when present) and ``n``."""
    has_base = any("base" in m for m in results.values())
    head = ("suite", "metric", "value", *(("base", "delta") if has_base else ()), "n")
    rows = []
    for name, metrics in results.items():
        for key, value in _numeric(metrics).items():
            cells = [name, key, f"{value:.4f}"]
            if has_base:
                base, delta = metrics.get("base", {}).get(key), metrics.get("delta", {}).get(key)
                cells += [
                    f"{base:.4f}" if base is not None else "",
                    f"{delta:+.4f}" if delta is not None else "",
                ]
            cells.append(str(metrics.get("n", "")))
            rows.append(cells)
    return render_table(head, rows) + "\n"


def _data_settings(recorded: dict[str, Any]) -> DataSettings:
    known = {f.name for f in dataclasses.fields(DataSettings)}
    return DataSettings(**{k: v for k, v in recorded.items() if k in known})


def resolve_task(
    *,
    data: str | None,
    adapter: str | None,
    limit: int | None = None,
    seed: int = 0,
    generate: bool = True,
    max_length: int = 512,
    max_new_tokens: int | None = None,
    allow_training_rows: bool = False,
) -> TaskRows:
    """Which rows the task suite scores, and how it says so.

    * an adapter written by ``train`` (its folder holds ``aletheia.json``) and no ``data``, or
      ``data`` equal to the run's: the run's own held-out rows, tokenized as the run tokenized them,
      exact match on the first ``eval_generate`` of them (what ``train`` reported);
    * ``data`` with a test split: that split;
    * ``data`` without one: every row, but only without an adapter or with ``allow_training_rows``
      (they may include the rows the adapter trained on);
    * neither: the embedded arithmetic task's test split.

    ``limit`` keeps a seeded sample of the rows (exact match on all of them).
    """
    run = read_run_record(adapter) if adapter else None
    recorded = (run or {}).get("settings", {}).get("data")
    if recorded is not None and (data is None or data == recorded.get("data")):
        settings = _data_settings(recorded)
        _, rows = load_rows(settings, run.get("seed", 0))
        try:
            load_data(settings.data, split="test", max_rows=1)
            split = "test split (as the adapter's run read it)"
        except MissingSplitError:
            split = f"held-out {settings.eval_fraction:.0%} of its rows, as the adapter's run split them"
        task = TaskRows(rows, settings.data or "the embedded arithmetic task", split, settings.max_length,
                        settings.completion_only_loss, settings.format, settings.eval_generate)  # fmt: skip
    else:
        name = data or "the embedded arithmetic task"
        try:
            task = TaskRows(load_data(data, split="test"), name, "test split", max_length)
        except MissingSplitError:
            if adapter and not allow_training_rows:
                raise ValueError(
                    f"--data {data!r} has no test split, and the adapter's run does not say which of its rows "
                    f"were held out, so scoring them could score the rows the adapter trained on. Omit --data "
                    f"to score the held-out rows of the adapter's run, pass data with a test split, or pass "
                    f"--allow_training_rows true to score every row anyway."
                ) from None
            task = TaskRows(
                load_data(data, split="train"), name, "every row (it has no test split)", max_length
            )
    if limit is not None:
        task.rows, task.generate = sample(task.rows, limit, seed), None
        task.split += f", a sample of {len(task.rows)} (seed {seed})"
    if not generate:
        task.generate = 0
    task.max_new_tokens = max_new_tokens
    return task


def eval_job(
    *,
    output_dir: str | None = None,
    model: str | None = None,
    adapter: str | None = None,
    suites: Sequence[str] | None = None,
    overwrite_output_dir: bool = False,
    compare_base: bool = False,
    trust_remote_code: bool = False,
    dtype: str | None = None,
    allow_training_rows: bool = False,
    log=None,
    **settings: Any,
) -> dict[str, Any]:
    """Load ``model`` (+ ``adapter``), run the suites, write ``eval.json`` and ``eval.md`` atomically.

    ``settings`` holds the suites' options: ``data``, ``text``, ``mmlu_dir``, ``mmlu_shots``,
    ``gsm8k``, ``gsm8k_generate``, ``generate``, ``limit``, ``seed``, ``max_length``,
    ``max_new_tokens``, ``batch_size``, ``allow_code_execution``, ``humaneval_samples``, and
    ``lm_eval_tasks`` / ``lm_eval_include`` / ``lm_eval_fewshot`` (lm-evaluation-harness tasks run on
    the in-memory model, reported as suites ``lm_eval:<task>``). The task suite's rows come from
    :func:`resolve_task`; with an adapter from ``train`` and no ``model``, the run's base model is
    loaded. Returns the eval.json record plus ``"table"`` (markdown), ``"files"`` and ``"output_dir"``.
    """
    if compare_base and not adapter:
        raise ValueError("--compare_base needs --adapter (the base model is the model without it)")
    names = resolve_suites(
        suites,
        mmlu_dir=settings.get("mmlu_dir"),
        gsm8k=settings.get("gsm8k"),
        allow_code_execution=settings.get("allow_code_execution", False),
    )
    out = check_output_dir(
        output_dir or default_output_dir("eval"), overwrite=overwrite_output_dir, create=False
    )
    say = log or (lambda line: None)  # run_suites gets log itself: None is silent, with no progress hooks
    start = time.perf_counter()
    run = read_run_record(adapter) if adapter else None
    if model is None and run is not None:
        model = (run.get("settings", {}).get("model") or {}).get("model")
    task = None
    if "task" in names:
        task = resolve_task(
            data=settings.get("data"), adapter=adapter, limit=settings.get("limit"), seed=settings.get("seed", 0),
            generate=settings.get("generate", True), max_length=settings.get("max_length", 512),
            max_new_tokens=settings.get("max_new_tokens"), allow_training_rows=allow_training_rows,
        )  # fmt: skip
        say(f"task: {task.describe()}")
    inputs = prepare_inputs(names, {**settings, "task": task})
    device = "cuda" if torch.cuda.is_available() else None
    net, tokenizer = load_model(
        model, device=device, dtype=DTYPES.get(dtype), trust_remote_code=trust_remote_code
    )
    if adapter:
        net = PeftModel.from_pretrained(net, adapter)
    net.eval()
    say(
        f"evaluating {', '.join(names)} on {model or 'the embedded model'}"
        + (f" + {adapter}" if adapter else "")
    )
    results = run_suites(net, tokenizer, inputs, settings, log=log, label="adapter: " if compare_base else "",
                         estimate_runs=2 if compare_base else 1)  # fmt: skip
    if compare_base:
        with net.disable_adapter() if adapter else nullcontext():
            base = run_suites(net, tokenizer, inputs, settings, log=log, label="base: ", estimate_runs=0)
        results = with_deltas(results, base)
    task_info = (
        {"dataset": task.dataset, "split": task.split, "rows": len(task.rows), "max_length": task.max_length,
         "exact_match_rows": len(task.rows) if task.generate is None else min(task.generate, len(task.rows))}
        if task is not None else None
    )  # fmt: skip
    record = {
        "suites": results,
        "model": model or "embedded",
        "adapter": adapter,
        "compare_base": compare_base,
        "task_data": task_info,
        "settings": {"suites": names, **settings},
        "seconds": time.perf_counter() - start,
        "versions": versions(),
    }
    table = markdown_table(results)
    title = f"# Evaluation of {record['model']}" + (f" + adapter {adapter}" if adapter else "")
    notes = _notes(results, task)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "eval.json", json.dumps(record, indent=2, default=str) + "\n")
    atomic_write_text(out / "eval.md", f"{title}\n\n" + "".join(f"- {n}\n" for n in notes) + f"\n{table}")
    return {
        **record,
        "table": table,
        "notes": notes,
        "files": ["eval.json", "eval.md"],
        "output_dir": str(out),
    }


def _notes(results: dict[str, dict], task: TaskRows | None) -> list[str]:
    """What a reader of the table needs to know: the task's rows, and how exact match was scored."""
    if task is None:
        return []
    note = exact_match_note(results.get("task", {}))
    return [f"task data: {task.describe()}", *([f"task {note}"] if note else [])]
