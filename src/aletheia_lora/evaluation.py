"""Task metrics: held-out loss and exact-match accuracy of numeric answers (greedy decoding).

One evaluation for ``train``'s before/after report and for ``eval``'s task suite
(``evaluate_task``): the same rows give the same numbers in both.

* Loss in bounded memory: a batch never holds more than ``LOGIT_BUDGET_BYTES`` of logits. Where
  the model takes ``logits_to_keep``, logits are computed only at positions that predict a
  target token (a prompt/completion row's completion), so a 262k-token vocabulary costs little;
  otherwise (or for plain text, where every position is a target) the batch shrinks instead.
* Generation stops at the answer: at EOS, or once the answer marker ``#### <number>`` is complete.
  The length budget comes from the gold answers (``answer_budget``: at least ``MIN_NEW_TOKENS``,
  and four times the longest gold answer), so a plain answer is never cut; answers that still hit
  the budget are counted (``cut_off``) and reported.
"""

from __future__ import annotations

import inspect
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import StoppingCriteria, StoppingCriteriaList

from .batches import IGNORE_INDEX, collate
from .data import detect_format, encode_prompt, extract_final_answer, format_prompt, tokenize_dataset

_NUMBER = re.compile(r"-?\d[\d,]*\.?\d*")

Progress = Callable[[int, int], None]  # progress(items done, items in all), called after each batch


def duration(seconds: float) -> str:
    """``seconds`` for a person: "40 s", "12 min", "2.5 h"."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 90 * 60 else f"{seconds / 3600:.1f} h"


@dataclass
class ProgressLog:
    """Progress lines of an evaluation (``suites.run_suites``, ``train``'s before/after): inside each
    suite, items done / total, rate and time left, at most one line every ``every`` seconds; and an
    estimate of the whole evaluation (``runs`` runs of the suites in ``planned``, ``what`` in words).

    ``planned``: per suite, the items it scores (one forward pass each) and then the answers it
    generates (a forward pass per new token). Each suite's two kinds of work are timed by their own
    first batch: a 512-token text window costs more to score than a short task row, and an answer
    more than either. Until a suite's first batch, the slowest rate of the same kind seen so far
    stands in for it; answers with no rate yet are left out and said so. The estimate is said after
    the first batch, and again whenever a newly timed batch moves it by more than a quarter. No
    estimate when nothing is planned. ``clock``: seconds, for tests."""

    say: Callable[[str], Any]
    label: str
    every: float
    planned: dict[str, tuple[int, int]]
    what: str
    runs: int = 1
    clock: Callable[[], float] = time.perf_counter

    def __post_init__(self) -> None:
        self._rates: dict[tuple[str, str], float] = {}  # (suite, "scored" / "generated") -> s per item
        self._said: float | None = None  # the estimate last said, in seconds

    def _rate(self, suite: str, kind: str) -> float | None:
        same_kind = [rate for (_, k), rate in self._rates.items() if k == kind]
        return self._rates.get((suite, kind), max(same_kind, default=None))

    def _estimate(self, suite: str, kind: str, took: float, items: int) -> None:
        if (suite, kind) in self._rates or items <= 0 or not self.runs or suite not in self.planned:
            return
        self._rates[suite, kind] = took / items
        work = [
            (s, k, n) for s, counts in self.planned.items() for k, n in zip(("scored", "generated"), counts)
        ]
        rated = [(n, self._rate(s, k)) for s, k, n in work if n]
        seconds = self.runs * sum(n * rate for n, rate in rated if rate is not None)
        untimed = self.runs * sum(n for n, rate in rated if rate is None)
        if self._said is not None and abs(seconds - self._said) <= self._said / 4:
            return
        self._said = seconds
        first = "first batch" if kind == "scored" else "first batch of answers"
        line = f"  {self.label}{suite}: {first} took {took:.1f} s ({items} items); estimated ~{duration(seconds)}"
        items_in_all = self.runs * sum(n for *_, n in work)
        line += f" for {self.what} ({items_in_all} items; rough)"
        if untimed:
            line += f", not counting {untimed} answers to generate (timed after their first batch; they cost most)"
        self.say(line)

    def suite(self, name: str, scored_items: int | None = None) -> Progress:
        """Progress of one suite: its first ``scored_items`` items are scored, the rest generated
        (``None``: all scored)."""
        start = last = batch_start = self.clock()
        previous = 0

        def report(done: int, total: int) -> None:
            nonlocal last, batch_start, previous
            now = self.clock()
            kind = "scored" if scored_items is None or done <= scored_items else "generated"
            self._estimate(name, kind, now - batch_start, done - previous)
            batch_start, previous = now, done
            if now - last >= self.every:
                rate = done / max(now - start, 1e-9)
                self.say(
                    f"  {self.label}{name}: {done}/{total} items, {rate:.3g} items/s, "
                    f"~{duration((total - done) / rate)} left"
                )
                last = now

        return report


def phase_progress(progress: Progress | None, before: int, total: int) -> Progress | None:
    """``progress`` for one phase of a longer job: the phase's items done count on from ``before``,
    out of the job's ``total``."""
    if progress is None:
        return None
    return lambda done, _: progress(before + done, total)


def extract_answer(text: str) -> str | None:
    """The number after ``####`` (GSM8K style), else the last number in ``text``; commas dropped."""
    value = extract_final_answer(text)
    if value is None:
        numbers = _NUMBER.findall(text)
        if not numbers:
            return None
        value = numbers[-1]
    value = value.replace(",", "").rstrip(".")
    if "." in value:
        value = value.rstrip("0").rstrip(".")
    return value


LOGIT_BUDGET_BYTES = 256 * 2**20  # fp32 logits one loss batch may hold
MIN_NEW_TOKENS = 256  # generation budget floor: room for a step-by-step answer before the number
_ANSWER_DONE = re.compile(r"####\s*-?[\d,]*\.?\d+[^\d.,]")  # the marker, a number, then anything else


def _takes_logits_to_keep(model: nn.Module) -> bool:
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - a forward without a signature
        return False


def _vocab_size(model: nn.Module) -> int:
    out = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    weight = getattr(out, "weight", None)
    if weight is not None:
        return int(weight.shape[0])
    return int(getattr(getattr(model, "config", None), "vocab_size", 32000))


def _loss_batches(rows: Sequence[dict], batch_size: int, vocab: int, budget: int, targets_only: bool):
    """Slices of ``rows``: at most ``batch_size`` rows, and at most ``budget`` bytes of fp32 logits
    (``targets_only``: counting only positions that predict a target)."""
    start = 0
    while start < len(rows):
        end, width = start, 0
        while end < len(rows) and end - start < batch_size:
            labels = rows[end].get("labels") or rows[end]["input_ids"]
            need = sum(1 for t in labels[1:] if t != IGNORE_INDEX) if targets_only else len(labels)
            width = max(width, need)
            if end > start and (end - start + 1) * width * vocab * 4 > budget:
                break
            end += 1
        yield rows[start:end]
        start = end


def _chunk_loss(model: nn.Module, chunk: list[dict], device, pad: int, keep: bool) -> tuple[float, int]:
    """Summed loss and number of target tokens of one batch of ``mean_loss``."""
    batch = {k: v.to(device) for k, v in collate(chunk, pad).items()}
    targets = batch["labels"][:, 1:]
    kwargs: dict[str, Any] = {}
    if keep:  # logits only where a target token is predicted
        positions = torch.nonzero((targets != IGNORE_INDEX).any(0)).flatten()
        if positions.numel() == 0:
            return 0.0, 0
        kwargs["logits_to_keep"] = positions
        targets = targets[:, positions]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs).logits
    if not keep:
        logits = logits[:, :-1]
    total = 0.0
    for row in range(logits.shape[0]):  # fp32 one row at a time: a bf16 batch is not copied whole
        loss = nn.functional.cross_entropy(
            logits[row].float(), targets[row], ignore_index=IGNORE_INDEX, reduction="sum"
        )
        total += loss.item()
    return total, int((targets != IGNORE_INDEX).sum())


@torch.no_grad()
def mean_loss(
    model: nn.Module,
    rows: Sequence[dict],
    *,
    batch_size: int = 8,
    pad_token_id: int = 0,
    logit_budget_bytes: int = LOGIT_BUDGET_BYTES,
    progress: Progress | None = None,
) -> float:
    """Mean next-token loss over all target tokens (labels != -100) of tokenized ``rows``, in
    bounded memory (module docs): at most ``batch_size`` rows and ``logit_budget_bytes`` of logits
    per forward pass. The result does not depend on the batching. ``progress``: rows done / rows."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    keep = _takes_logits_to_keep(model)
    vocab = _vocab_size(model)
    rows = list(rows)
    total, count, done = 0.0, 0, 0
    try:
        for chunk in _loss_batches(rows, batch_size, vocab, logit_budget_bytes, keep):
            loss, targets = _chunk_loss(model, chunk, device, pad_token_id, keep)
            total, count, done = total + loss, count + targets, done + len(chunk)
            if progress is not None:
                progress(done, len(rows))
    finally:
        model.train(was_training)
    return total / count if count else math.nan


def answer_budget(tokenizer: Any, rows: Sequence[dict], *, minimum: int = MIN_NEW_TOKENS) -> int:
    """New tokens a generated answer may take: ``minimum``, or four times the longest gold answer in
    tokens if that is more, so that no answer of the gold's length (or a verbose one) is cut."""
    longest = max(
        (len(tokenizer(r["answer"], add_special_tokens=False)["input_ids"]) for r in rows), default=0
    )
    return max(minimum, 4 * longest)


class _AnswerComplete(StoppingCriteria):
    """Stops a row once its new text holds a complete ``#### <number>`` (EOS stops it anyway)."""

    def __init__(self, tokenizer: Any, prompt_length: int) -> None:
        self.tokenizer, self.prompt_length = tokenizer, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length :], skip_special_tokens=True)
        return torch.tensor([bool(_ANSWER_DONE.search(t)) for t in texts], device=input_ids.device)


@torch.no_grad()
def exact_match(
    model: nn.Module,
    tokenizer: Any,
    rows: Sequence[dict],
    *,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Greedy-decode an answer to each ``{"question", "answer"}`` row and compare final numbers.

    Generation stops at EOS or a complete ``#### <number>``; ``max_new_tokens`` defaults to
    :func:`answer_budget`; ``progress``: rows done / rows. Returns ``{"exact_match": fraction, "n":
    count, "cut_off": answers that hit the budget unfinished, "max_new_tokens": the budget,
    "examples": the first few}``.
    """
    budget = max_new_tokens if max_new_tokens is not None else answer_budget(tokenizer, rows)
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    correct, cut_off, examples = 0, 0, []
    try:
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            ids = [encode_prompt(format_prompt(r["question"], tokenizer), tokenizer) for r in chunk]
            enc = tokenizer.pad({"input_ids": ids}, return_tensors="pt").to(device)  # as training saw them
            width = enc["input_ids"].shape[1]
            out = model.generate(
                **enc,
                max_new_tokens=budget,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                stopping_criteria=StoppingCriteriaList([_AnswerComplete(tokenizer, width)]),
            )
            new = out[:, width:]
            texts = tokenizer.batch_decode(new, skip_special_tokens=True)
            for row, text, tokens in zip(chunk, texts, new):
                gold = extract_answer(row["answer"])
                ok = gold is not None and extract_answer(text) == gold
                correct += ok
                ended = tokenizer.eos_token_id in tokens.tolist() or _ANSWER_DONE.search(text)
                cut_off += int(not ended and len(tokens) >= budget)
                if len(examples) < 3:
                    examples.append(
                        {"question": row["question"], "output": text.strip(), "gold": gold, "correct": ok}
                    )
            if progress is not None:
                progress(i + len(chunk), len(rows))
    finally:
        model.train(was_training)
        tokenizer.padding_side = side
    return {
        "exact_match": correct / max(1, len(rows)),
        "n": len(rows),
        "cut_off": cut_off,
        "max_new_tokens": budget,
        "examples": examples,
    }


def numeric_answers(rows: Sequence[dict]) -> bool:
    """Whether every row is a question with a numeric gold answer (``#### <number>``): exact match applies."""
    return bool(rows) and all(
        "question" in r and extract_final_answer(str(r.get("answer", ""))) for r in rows
    )


def exact_match_rows(rows: Sequence[dict], generate: int | None) -> list[dict]:
    """The rows ``evaluate_task`` generates answers for: the first ``generate`` (``None``: all), or
    none when their answers are not numeric."""
    chosen = list(rows if generate is None else rows[:generate])
    return chosen if numeric_answers(chosen) else []


def evaluate_task(
    model: nn.Module,
    tokenizer: Any,
    rows: Sequence[dict],
    *,
    tokenized: Sequence[dict] | None = None,
    format: str | None = None,
    max_length: int = 512,
    completion_only_loss: bool = True,
    generate: int | None = None,
    max_new_tokens: int | None = None,
    batch_size: int = 8,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Held-out loss of ``rows`` and, where their answers are numeric, greedy exact match of the first
    ``generate`` of them (``None``: all; 0: none). The one task evaluation of ``train`` and ``eval``.
    ``max_new_tokens``: the generation budget (default :func:`answer_budget`).

    ``tokenized``: the rows already tokenized (as training tokenized them); else they are tokenized
    here with ``format`` (default: detected), ``max_length`` and ``completion_only_loss``. Returns
    ``loss``, ``n``, and with exact match ``exact_match``, ``exact_match_n``, ``cut_off``,
    ``max_new_tokens`` and ``examples``; ``exact_match_skipped`` says why exact match was not run.
    ``progress``: rows scored, then answers generated, out of both together.
    """
    rows = list(rows)
    if tokenized is None:
        fmt = format or detect_format(rows[0].keys())
        tokenized = tokenize_dataset(rows, tokenizer, format=fmt, max_length=max_length,
                                     completion_only_loss=completion_only_loss)  # fmt: skip
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    chosen = exact_match_rows(rows, generate)
    total = len(tokenized) + len(chosen)
    scoring = phase_progress(progress, 0, total)
    loss = mean_loss(model, tokenized, batch_size=batch_size, pad_token_id=pad, progress=scoring)
    out: dict[str, Any] = {"loss": loss, "n": len(tokenized)}
    if not chosen:
        if rows and generate != 0:  # rows to generate for, but their answers are not numbers
            out["exact_match_skipped"] = "answers are not numeric (#### <number>): loss only"
        return out
    generating = phase_progress(progress, len(tokenized), total)
    batch = max(batch_size, 16)
    em = exact_match(
        model, tokenizer, chosen, batch_size=batch, max_new_tokens=max_new_tokens, progress=generating
    )
    out.update(
        exact_match=em["exact_match"],
        exact_match_n=em["n"],
        cut_off=em["cut_off"],
        max_new_tokens=em["max_new_tokens"],
        examples=em["examples"],
    )
    return out
