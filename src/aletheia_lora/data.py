"""Datasets -> tokenized causal-LM examples with a label mask, and the embedded default task.

Row formats (``detect_format`` picks one from the column names, ``format=`` overrides it):

=====================  =====================================  =====================================
format                 columns                                loss (``completion_only_loss=True``)
=====================  =====================================  =====================================
``text``               ``text``                               every token
``prompt_completion``  ``prompt``, ``completion``             completion + EOS
``question_answer``    ``question``, ``answer`` (GSM8K)       answer + EOS
``messages``           ``messages``: [{role, content}, ...]   every assistant turn
``alpaca``             ``instruction``, ``output``,           output + EOS
                       optional ``input``
=====================  =====================================  =====================================

``question_answer`` and ``alpaca`` prompts come from ``format_prompt`` (the tokenizer's chat
template when it has one); ``prompt_completion`` prompts are used verbatim. Labels are -100 where
no loss is taken; ``DataCollator`` pads batches for ``transformers.Trainer``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .batches import IGNORE_INDEX, collate
from .models import hub_unreachable, looks_like_path, offline_switch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from .settings import DataSettings

FORMATS = ("text", "prompt_completion", "question_answer", "messages", "alpaca")
_ALIASES = {
    "prompt+completion": "prompt_completion",
    "question+answer": "question_answer",
    "qa": "question_answer",
    "gsm8k": "question_answer",
    "chat": "messages",
    "instruction+input+output": "alpaca",
    "instruction": "alpaca",
}
_EXPECTED = (
    "expected one of the formats text / prompt+completion / question+answer / messages / "
    "instruction+input+output, or name the format (--format on the command line, format= in Python)"
)
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
_EVAL_SPLITS = ("test", "eval", "validation", "valid", "dev")


# --------------------------------------------------------------------------- embedded task

_NAMES = ("Tom", "Anna", "Ben", "Mia", "Sam", "Lily", "Max", "Zoe", "Leo", "Emma", "Jack", "Nora")
_ITEMS = ("apples", "pencils", "stickers", "marbles", "cookies", "books", "coins", "cards", "shells", "toys")


def _arithmetic_example(rng: random.Random) -> dict[str, str]:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    kind = rng.choice(("add", "subtract", "multiply", "two_step"))
    if kind == "add":
        a, b = rng.randint(2, 50), rng.randint(2, 49)
        question = f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?"
        steps, result = [f"{a} + {b} = {a + b}"], a + b
    elif kind == "subtract":
        a = rng.randint(10, 99)
        b = rng.randint(1, a - 1)
        question = f"{name} has {a} {item} and gives {b} of them away. How many {item} does {name} have left?"
        steps, result = [f"{a} - {b} = {a - b}"], a - b
    elif kind == "multiply":
        a, b = rng.randint(2, 9), rng.randint(2, 12)
        question = (
            f"{name} buys {a} boxes with {b} {item} in each box. How many {item} does {name} buy in total?"
        )
        steps, result = [f"{a} * {b} = {a * b}"], a * b
    else:
        a, b = rng.randint(5, 40), rng.randint(2, 30)
        c = rng.randint(1, a + b - 1)
        question = (
            f"{name} has {a} {item}, buys {b} more and then gives {c} away. "
            f"How many {item} does {name} have now?"
        )
        steps, result = [f"{a} + {b} = {a + b}", f"{a + b} - {c} = {a + b - c}"], a + b - c
    return {"question": question, "answer": "\n".join(steps) + f"\n#### {result}"}


def make_arithmetic_task(n_train: int = 2000, n_eval: int = 200, seed: int = 0) -> dict[str, list[dict]]:
    """The embedded default task: templated arithmetic word problems, GSM8K style.

    Four templates (add, subtract, multiply, add-then-subtract) over small numbers (1-2 digits,
    answers 1-119), 12 names and 10 objects. Each row is ``{"question": str, "answer": str}``
    where the answer is a worked solution ending in ``#### <number>``, e.g.
    ``"Tom has 12 apples and buys 7 more. How many apples does Tom have now?"`` ->
    ``"12 + 7 = 19\\n#### 19"``. A 135M instruct model picks up the format and most of the
    arithmetic within a few dozen LoRA steps.

    Returns ``{"train": [n_train rows], "test": [n_eval rows]}``. The same ``seed`` always gives
    the same rows; every question is unique, so no test question appears in train.
    """
    if n_train < 0 or n_eval < 0:
        raise ValueError(f"n_train={n_train} and n_eval={n_eval} must both be >= 0")
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    for _ in range(50 * (n_train + n_eval) + 100):
        if len(rows) == n_train + n_eval:
            break
        row = _arithmetic_example(rng)
        if row["question"] not in seen:
            seen.add(row["question"])
            rows.append(row)
    else:
        raise ValueError(f"could not draw {n_train + n_eval} distinct questions; ask for fewer")
    return {"train": rows[:n_train], "test": rows[n_train:]}


_FINAL_ANSWER = re.compile(r"####\s*(-?[\d,]*\.?\d+)")


def extract_final_answer(text: str) -> str | None:
    """The number after the first ``####`` in ``text`` (commas removed), or ``None`` if absent."""
    match = _FINAL_ANSWER.search(text)
    return match.group(1).replace(",", "") if match else None


# --------------------------------------------------------------------------- formats


def detect_format(columns: Iterable[str]) -> str:
    """The row format implied by a dataset's column names (one of ``FORMATS``).

    Checked in order: ``messages``; ``prompt`` + ``completion``; ``question`` + ``answer``;
    ``instruction`` + ``output`` (``input`` optional); ``text``. Extra columns are ignored.
    Raises ``ValueError`` naming the columns when none matches.
    """
    cols = set(columns)
    if "messages" in cols:
        return "messages"
    if {"prompt", "completion"} <= cols:
        return "prompt_completion"
    if {"question", "answer"} <= cols:
        return "question_answer"
    if {"instruction", "output"} <= cols:
        return "alpaca"
    if "text" in cols:
        return "text"
    raise ValueError(f"rows have columns {sorted(map(str, cols))}; {_EXPECTED}")


def _normalise_format(format: str) -> str:
    name = _ALIASES.get(format.strip().lower(), format.strip().lower())
    if name not in FORMATS:
        raise ValueError(f"format={format!r} is unknown; use one of {', '.join(FORMATS)}")
    return name


def _has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(question: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """The prompt text the model sees before its answer, for training and for generation.

    With a chat template: the template applied to one user message, with the assistant header
    (``add_generation_prompt=True``); it may contain special-token text such as
    ``<|im_start|>``. Without one: ``"Question: {question}\\nAnswer: "``. Turn it into ids with
    ``encode_prompt`` so that a BOS token is neither lost nor doubled.
    """
    if _has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
    return f"Question: {question}\nAnswer: "


def encode_prompt(text: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids of a prompt; the tokenizer's own special tokens (BOS) are added unless the text
    already starts with the BOS token (as chat templates that need one write it)."""
    bos = getattr(tokenizer, "bos_token", None)
    add_special = not (bos and text.startswith(bos))
    return list(tokenizer(text, add_special_tokens=add_special)["input_ids"])


def _encode_plain(text: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _with_eos(ids: list[int], tokenizer: PreTrainedTokenizerBase) -> list[int]:
    eos = tokenizer.eos_token_id
    return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids


def _text(row: Mapping[str, Any], key: str, index: int) -> str:
    value = row.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"row {index}: column {key!r} is {type(value).__name__}, expected a string")
    return _checked_text(value, f"row {index}: column {key!r}")


def _checked_text(value: str, where: str) -> str:
    """``value`` if it is valid Unicode; tokenizers fail obscurely on lone surrogates such as the
    JSON escape ``"\\ud800"``, so name the row instead."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"{where} holds invalid Unicode ({err.reason}: {value[err.start : err.end]!r} at character "
            f"{err.start}, e.g. a lone surrogate escape in JSON); fix or remove that text"
        ) from None
    return value


# Segments: (token ids, takes loss). Concatenated, they make one example.
Segments = list[tuple[list[int], bool]]


def _message_segments(messages: Any, tokenizer: PreTrainedTokenizerBase, index: int) -> Segments:
    if not isinstance(messages, list) or not all(
        isinstance(m, Mapping) and "role" in m and "content" in m for m in messages
    ):
        raise ValueError(f"row {index}: 'messages' must be a list of {{'role': ..., 'content': ...}} dicts")
    for turn, m in enumerate(messages):
        for key in ("role", "content"):
            if not isinstance(m[key], str):
                raise ValueError(
                    f"row {index}: messages[{turn}][{key!r}] is {type(m[key]).__name__}, expected a string"
                )
            _checked_text(m[key], f"row {index}: messages[{turn}][{key!r}]")
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    texts: list[tuple[str, bool]] = []
    if not _has_chat_template(tokenizer):  # plain "role: content" lines
        for m in messages:
            if m["role"] == "assistant":
                texts += [
                    ("assistant: ", False),
                    (m["content"] + (tokenizer.eos_token or ""), True),
                    ("\n", False),
                ]
            else:
                texts.append((f"{m['role']}: {m['content']}\n", False))
    elif (spans := _assistant_spans(messages, tokenizer)) is not None:
        full, cuts = spans
        pos = 0
        for start, end in cuts:
            texts += [(full[pos:start], False), (full[start:end], True)]
            pos = end
        texts.append((full[pos:], False))
    else:  # the template re-renders history differently: loss on the last answer only
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            return []
        prompt = tokenizer.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True)
        texts = [(prompt, False), (messages[last]["content"] + (tokenizer.eos_token or ""), True)]
    texts = [(text, loss) for text, loss in texts if text]
    return [
        (encode_prompt(text, tokenizer) if i == 0 else _encode_plain(text, tokenizer), loss)
        for i, (text, loss) in enumerate(texts)
    ]


def _assistant_spans(messages: list[dict], tokenizer: PreTrainedTokenizerBase):
    """Character spans of each assistant turn in the rendered conversation, or None if the
    template does not render conversations as a growing prefix."""

    def render(msgs: list[dict], gen: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen) if msgs else ""

    try:
        full = render(messages, False)
        cuts = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before, after = render(messages[:i], True), render(messages[: i + 1], False)
            if not (after.startswith(before) and full.startswith(after)) or (
                cuts and len(before) < cuts[-1][1]
            ):
                return None
            end = len(after)
            eos = tokenizer.eos_token
            if eos and eos in after[len(before) :]:  # stop the loss at the end-of-turn token
                end = after.rindex(eos) + len(eos)
            cuts.append((len(before), end))
    except Exception:  # templates that reject partial conversations
        return None
    return full, cuts


def _row_segments(
    row: Mapping[str, Any], fmt: str, tokenizer: PreTrainedTokenizerBase, index: int
) -> Segments:
    if fmt == "text":
        return [(_with_eos(encode_prompt(_text(row, "text", index), tokenizer), tokenizer), True)]
    if fmt == "messages":
        return _message_segments(row.get("messages"), tokenizer, index)
    if fmt == "prompt_completion":
        prompt, completion = _text(row, "prompt", index), _text(row, "completion", index)
    elif fmt == "question_answer":
        prompt, completion = (
            format_prompt(_text(row, "question", index), tokenizer),
            _text(row, "answer", index),
        )
    else:  # alpaca
        instruction, extra = _text(row, "instruction", index), _text(row, "input", index)
        question = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        prompt, completion = format_prompt(question, tokenizer), _text(row, "output", index)
    completion_ids = _with_eos(_encode_plain(completion, tokenizer), tokenizer) if completion else []
    return [(encode_prompt(prompt, tokenizer), False), (completion_ids, True)]


def tokenize_dataset(
    rows: Iterable[Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    format: str | None = None,
    max_length: int = 512,
    completion_only_loss: bool = True,
) -> list[dict[str, list[int]]]:
    """Tokenize rows into ``{"input_ids", "attention_mask", "labels"}`` lists of ints.

    Args:
        rows: dicts (a list, or a ``datasets.Dataset``) in one of the formats of ``FORMATS``.
        tokenizer: a transformers tokenizer; its EOS token ends every completion.
        format: one of ``FORMATS`` (aliases such as ``"question+answer"`` work); ``None``
            (default) detects it from the first row's keys with ``detect_format``.
        max_length: keep at most this many tokens per example (default 512); longer examples are
            cut at the end.
        completion_only_loss: if True (default), labels are -100 on prompt tokens (and on
            non-assistant turns of ``messages``) so only completions are learned; if False, or for
            ``text``, labels equal ``input_ids``.

    Prompt and completion are tokenized separately and concatenated, exactly as a prompt is
    tokenized for generation. Rows left with no label to predict (an empty completion, or a prompt
    that fills ``max_length``) are dropped, with one ``UserWarning`` giving the count.
    Empty ``rows`` is an error.
    """
    if max_length < 2:
        raise ValueError(f"max_length={max_length}; it must be >= 2 (one token to predict another)")
    rows = list(rows)
    if not rows:
        raise ValueError("no rows to tokenize; the dataset is empty")
    for index, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ValueError(f"row {index} is a {type(row).__name__}, expected a dict of columns")
    fmt = _normalise_format(format) if format is not None else detect_format(rows[0].keys())
    out: list[dict[str, list[int]]] = []
    for index, row in enumerate(rows):
        input_ids: list[int] = []
        labels: list[int] = []
        for ids, loss in _row_segments(row, fmt, tokenizer, index):
            input_ids += ids
            labels += ids if (loss or not completion_only_loss) else [IGNORE_INDEX] * len(ids)
        input_ids, labels = input_ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels[1:]):  # position 0 is never a target
            continue
        out.append({"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels})
    skipped = len(rows) - len(out)
    if skipped:
        warnings.warn(
            f"skipped {skipped} of {len(rows)} rows that have no completion tokens left to learn "
            f"(empty completion, or a prompt of max_length={max_length} tokens or more); "
            f"raise max_length to keep them",
            stacklevel=2,
        )
    if not out:
        raise ValueError(f"all {len(rows)} rows were skipped: none has completion tokens within max_length")
    return out


# --------------------------------------------------------------------------- collation


@dataclass
class DataCollator:
    """``collate`` as a callable object, for ``transformers.Trainer(data_collator=...)``.

    Example: ``DataCollator(tokenizer.pad_token_id)``.
    """

    pad_token_id: int

    def __call__(self, batch: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        return collate(batch, self.pad_token_id)


# --------------------------------------------------------------------------- loading


def _bad_file(path: Path, what: str, line: int | None = None) -> ValueError:
    where = f"{path}, line {line}" if line is not None else str(path)
    return ValueError(f"data file {where}: {what}")


def _check_objects(rows: list[Any], path: Path, lines: list[int] | None = None) -> list[dict]:
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise _bad_file(
                path,
                f"expected a JSON object per row, got {type(row).__name__}",
                lines[i] if lines else None,
            )
    return rows


_BOM = b"\xef\xbb\xbf"


def _not_utf8(path: Path, raw: bytes, err: UnicodeDecodeError, line: int, offset: int) -> ValueError:
    bad = raw[err.start : err.end]
    return _bad_file(
        path,
        f"not UTF-8 text (byte {bad!r} at byte offset {offset + err.start}: {err.reason}); re-save it as UTF-8",
        line,
    )


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of a UTF-8 file, read one line at a time (a byte order mark is dropped).
    Only ``\\n`` ends a line, so a JSON string holding U+2028 stays whole."""
    offset = 0
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            skip = len(_BOM) if number == 1 and raw.startswith(_BOM) else 0
            try:
                yield number, raw[skip:].decode("utf-8")
            except UnicodeDecodeError as err:
                raise _not_utf8(path, raw[skip:], err, number, offset + skip) from err
            offset += len(raw)


def _read_jsonl(path: Path, max_rows: int | None = None) -> list[dict]:
    rows, lines = [], []
    for number, line in _lines(path):
        if max_rows is not None and len(rows) >= max_rows:
            break
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise _bad_file(path, f"invalid JSON ({err.msg} at column {err.colno})", number) from err
        lines.append(number)
    return _check_objects(rows, path, lines)


def _read_json(path: Path, max_rows: int | None = None) -> list[dict]:
    """A JSON document is parsed whole (use JSON Lines for files larger than memory)."""
    raw = path.read_bytes()
    skip = len(_BOM) if raw.startswith(_BOM) else 0
    try:
        text = raw[skip:].decode("utf-8")
    except UnicodeDecodeError as err:
        raise _not_utf8(path, raw[skip:], err, raw[: skip + err.start].count(b"\n") + 1, skip) from err
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # JSON Lines saved as .json
            return _read_jsonl(path, max_rows)
        raise _bad_file(path, f"invalid JSON ({err.msg} at column {err.colno})", err.lineno) from err
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]}
    if not isinstance(data, list):
        raise _bad_file(path, f"expected a JSON list of row objects, got {type(data).__name__}")
    return _check_objects(data[:max_rows], path)


def _read_csv(path: Path, max_rows: int | None = None) -> list[dict]:
    reader = csv.DictReader(piece for _, line in _lines(path) for piece in line.splitlines())
    rows = []
    try:
        for row in reader:
            if max_rows is not None and len(rows) >= max_rows:
                break
            if None in row or None in row.values():
                raise _bad_file(
                    path,
                    f"expected {len(reader.fieldnames or [])} fields ({reader.fieldnames}) in every row",
                    reader.line_num,
                )
            rows.append(row)
    except csv.Error as err:
        raise _bad_file(path, f"invalid CSV ({err})", reader.line_num) from err
    return rows


def _read_parquet(path: Path, max_rows: int | None = None) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if max_rows is None:
            return pq.read_table(path).to_pylist()
        rows: list[dict] = []
        for batch in pq.ParquetFile(path).iter_batches(batch_size=min(max_rows, 65536) or 1):
            rows += batch.to_pylist()[: max_rows - len(rows)]
            if len(rows) >= max_rows:
                break
        return rows
    except (pa.ArrowException, OSError) as err:
        raise _bad_file(path, f"not a readable Parquet file ({err})") from err


def _read_file(path: Path, max_rows: int | None = None) -> list[dict]:
    """Rows of one file. JSON Lines, CSV and Parquet are read lazily: a line (a batch) at a time,
    stopping after ``max_rows`` rows, so the rest of a huge file is never read."""
    suffix = path.suffix.lower()
    if suffix not in DATA_SUFFIXES:
        raise ValueError(f"data file {path} has suffix {suffix!r}; supported: {', '.join(DATA_SUFFIXES)}")
    reader = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}[
        suffix
    ]
    rows = reader(path, max_rows)
    if not rows:
        raise _bad_file(path, "the file has no rows")
    return rows


class MissingSplitError(ValueError):
    """The data exists but has no such split (a single file has only "train")."""


def _pick_split(splits: Mapping[str, Any], split: str, source: str) -> Any:
    if split in splits:
        return splits[split]
    if split in _EVAL_SPLITS:
        for alias in _EVAL_SPLITS:
            if alias in splits:
                return splits[alias]
    raise MissingSplitError(f"{source} has no split {split!r}; it has {sorted(splits)}")


def _single_split(rows: Any, split: str, source: str, max_rows: int | None = None) -> list[dict]:
    """``rows`` (a list, a ``Dataset``, or a callable reading them) when ``split`` is "train"; any other
    split is an error raised before anything is read."""
    if split != "train":
        raise MissingSplitError(
            f"{source} is a single set of rows with no {split!r} split; load it with split='train' and hold "
            f"rows out with train_eval_split(rows), or pass a separate file for evaluation"
        )
    if callable(rows):
        return rows(max_rows)
    return rows[:max_rows] if isinstance(rows, list) else _head(rows, max_rows)


def _head(dataset: Any, max_rows: int | None) -> list[dict]:
    """The first ``max_rows`` rows of a (memory-mapped) ``datasets.Dataset`` as dicts."""
    if max_rows is not None and max_rows < len(dataset):
        dataset = dataset.select(range(max_rows))
    return dataset.to_list()


def _load_folder(folder: Path, split: str, max_rows: int | None) -> list[dict]:
    if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
        import datasets

        loaded = datasets.load_from_disk(str(folder))
        if isinstance(loaded, datasets.DatasetDict):
            return _head(_pick_split(loaded, split, f"dataset folder {folder}"), max_rows)
        return _single_split(loaded, split, f"dataset folder {folder}", max_rows)
    files = {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in DATA_SUFFIXES}
    if files:
        return _read_file(_pick_split(files, split, f"data folder {folder}"), max_rows)
    raise ValueError(
        f"data folder {folder} is neither a datasets.save_to_disk folder nor holds <split>"
        f"{'/'.join(DATA_SUFFIXES)} files (e.g. train.jsonl)"
    )


def _load_hub(name: str, split: str, max_rows: int | None) -> list[dict]:
    import datasets

    repo, _, config = name.partition(":")
    hint = (
        f"Download it on a machine with internet access and save it with "
        f"datasets.load_dataset({repo!r}).save_to_disk('./my-data') (or export a .jsonl), then pass that "
        f"path; or leave the data out (omit --data; data=None in Python) for the embedded arithmetic task."
    )
    switch = offline_switch("HF_DATASETS_OFFLINE")
    # `datasets` reads its offline switch at import; when it will go online, check the Hub answers
    # first instead of waiting a minute for its retries.
    unreachable = None if datasets.config.HF_HUB_OFFLINE else hub_unreachable()
    if unreachable is not None:
        raise OSError(
            f"dataset {name!r} is not a local file or folder and {unreachable}. If it is in your Hugging "
            f"Face cache, set HF_HUB_OFFLINE=1 (before starting Python) to load it from there. {hint}"
        )
    try:
        loaded = datasets.load_dataset(repo, config or None, split=split)
    except (OSError, ValueError) as err:
        if "split" in str(err).lower() and isinstance(
            err, ValueError
        ):  # the dataset exists, the split does not
            raise MissingSplitError(f"dataset {name!r} has no split {split!r} ({err})") from err
        if switch is not None or datasets.config.HF_HUB_OFFLINE:
            raise OSError(
                f"dataset {name!r} is not a local file or folder and not in the Hugging Face cache, and it "
                f"cannot be downloaded: {switch or 'datasets is in offline mode'}. {hint}"
            ) from err
        raise OSError(f"could not load dataset {name!r} from the Hugging Face Hub ({err}). {hint}") from err
    return _head(loaded, max_rows)


def load_data(
    path: str | os.PathLike | None, *, split: str = "train", max_rows: int | None = None
) -> list[dict]:
    """Load rows (a list of dicts, one per example) from wherever the user points.

    Args:
        path: ``None`` or ``"embedded"``: the embedded arithmetic task (``make_arithmetic_task()``,
            2000 train / 200 test rows). A local ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet``
            file. A ``datasets.save_to_disk`` folder, or a folder of ``<split>.<suffix>`` files. Else
            a Hugging Face Hub dataset id, optionally ``"id:config"`` (e.g. ``"openai/gsm8k:main"``).
        split: which split (default ``"train"``); ``"test"`` also finds ``eval``/``validation``
            splits and vice versa. A single file or a single saved ``Dataset`` has only ``"train"``;
            hold rows out of it with ``train_eval_split``.
        max_rows: read at most this many rows (the first ones). JSON Lines, CSV and Parquet files
            are read lazily, so the rest of a huge file is never read; a ``.json`` document is
            parsed whole.

    Raises:
        FileNotFoundError: ``path`` looks like a path but nothing is there.
        ValueError: a missing split, an unsupported suffix, or an empty or malformed file (the
            message names the file and, for JSON Lines, CSV and JSON, the line number).
        OSError: a Hub dataset that cannot be loaded (offline: fails within seconds).
    """
    if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1):
        raise ValueError(f"max_rows={max_rows!r}; it must be a positive integer (or None for every row)")
    if path is None or os.fspath(path) == "embedded":
        return _pick_split(make_arithmetic_task(), split, "the embedded arithmetic task")[:max_rows]
    name = os.fspath(path)
    local = Path(name).expanduser()
    if local.is_file():
        return _single_split(lambda n: _read_file(local, n), split, f"data file {local}", max_rows)
    if local.is_dir():
        return _load_folder(local, split, max_rows)
    if looks_like_path(name) or local.suffix.lower() in DATA_SUFFIXES:
        raise FileNotFoundError(
            f"no such data file or folder: {str(local)!r}. Pass an existing .jsonl/.json/.csv/.parquet file, "
            f"a datasets.save_to_disk folder, a Hub dataset id, or leave it out (omit --data; None in Python) for the "
            f"embedded arithmetic task."
        )
    return _load_hub(name, split, max_rows)


def train_eval_split(rows: Sequence[Any], eval_fraction: float = 0.05, seed: int = 0) -> tuple[list, list]:
    """Hold out a deterministic random ``eval_fraction`` of ``rows`` (default 5 %, at least 1 row).

    Returns ``(train, eval)``, each in the original order; the same ``seed`` always picks the same
    rows. Needs at least 2 rows and ``0 < eval_fraction < 1``.
    """
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction={eval_fraction}; it must be between 0 and 1 (e.g. 0.05)")
    n = len(rows)
    if n < 2:
        raise ValueError(f"cannot split {n} row(s) into train and eval; need at least 2")
    n_eval = min(n - 1, max(1, round(n * eval_fraction)))
    held_out = set(random.Random(seed).sample(range(n), n_eval))
    train = [rows[i] for i in range(n) if i not in held_out]
    held = [rows[i] for i in range(n) if i in held_out]
    return train, held


# --------------------------------------------------------------------------- a command's data


def load_rows(data: DataSettings, seed: int) -> tuple[list[dict], list[dict]]:
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


@dataclass
class PreparedData:
    """A command's rows, raw and tokenized: training and held-out, and their format."""

    train_rows: list[dict]
    eval_rows: list[dict]
    format: str
    train: list[dict]  # tokenized
    eval: list[dict]  # tokenized


def prepare_data(data: DataSettings, tokenizer: PreTrainedTokenizerBase, seed: int) -> PreparedData:
    """:func:`load_rows`, the format detected unless ``data.format`` names it, both sets tokenized."""
    train_rows, eval_rows = load_rows(data, seed)
    fmt = data.format or detect_format(train_rows[0].keys())
    tok = dict(format=fmt, max_length=data.max_length, completion_only_loss=data.completion_only_loss)
    return PreparedData(
        train_rows,
        eval_rows,
        fmt,
        tokenize_dataset(train_rows, tokenizer, **tok),
        tokenize_dataset(eval_rows, tokenizer, **tok),
    )
