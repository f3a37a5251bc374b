"""Bad data, fuzzed with hypothesis: every row format and every text file reader, fed empty strings,
rows with no completion, rows longer than max_length, wrong types, missing keys, lone surrogates
and non-UTF-8 bytes. Each case must either tokenize (dropping rows with nothing to learn behind one
"skipped N of M rows" warning) or raise a ValueError that names the row, or the file and line --
never an exception from deep inside tokenizers, json, csv or torch."""

from __future__ import annotations

import json
import re
import warnings

import pytest
from conftest import word_tokenizer
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from aletheia_lora import data

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
SETTINGS = settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
WORDS = "the a cat dog sat on mat and ran to is was big small red blue one two".split()
# Vocabulary words plus the awkward ones: empty, whitespace, unknown, NUL, non-ASCII, a lone surrogate.
PIECES = [*WORDS, "", " ", "\n", "\t", "zebra", "\x00", "é", "日本", "🙂", "####", "[EOS]", "[PAD]"]
KEYS = {
    "text": ["text"],
    "prompt_completion": ["prompt", "completion"],
    "question_answer": ["question", "answer"],
    "alpaca": ["instruction", "input", "output"],
}
TOKENIZER = word_tokenizer()

texts = st.one_of(
    st.lists(st.sampled_from(PIECES), max_size=60).map(" ".join),
    st.lists(st.sampled_from(PIECES), max_size=60).map(" ".join),
    st.lists(st.sampled_from([*PIECES, "\ud800"]), max_size=8).map(" ".join),  # may hold a lone surrogate
    st.text(max_size=20),
)
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), texts)
values = st.one_of(
    texts, texts, texts, scalars, st.lists(scalars, max_size=3), st.dictionaries(texts, scalars, max_size=2)
)


def _messages(value) -> st.SearchStrategy:
    turn = st.fixed_dictionaries(
        {"role": st.one_of(st.sampled_from(["user", "assistant", "system"]), value), "content": value}
    )
    return st.one_of(
        st.lists(turn, max_size=4),
        st.lists(st.dictionaries(st.sampled_from(["role", "content", "name"]), value), max_size=3),
        value,
    )


@st.composite
def rows_of(draw, fmt: str) -> list:
    """1-6 rows of ``fmt``: each key present with a value, or missing (never in the first row, which
    fixes the detected format). Two times in three every value is a string, so that the skipping
    path is reached as often as the error path."""
    value = texts if draw(st.integers(0, 2)) else values
    rows = []
    for i in range(draw(st.integers(1, 6))):
        if fmt == "messages":
            row = {"messages": draw(_messages(value))} if i == 0 or draw(st.integers(0, 4)) else {}
        else:
            row = {k: draw(value) for k in KEYS[fmt] if i == 0 or draw(st.integers(0, 4))}
        rows.append(row)
    if draw(st.integers(0, 9)) == 0:
        rows.append(draw(st.one_of(scalars, st.lists(scalars, max_size=2))))  # not a row at all
    return rows


def _check_examples(out: list, max_length: int) -> None:
    assert out
    for ex in out:
        assert set(ex) == {"input_ids", "attention_mask", "labels"}
        assert 1 <= len(ex["input_ids"]) <= max_length
        assert len(ex["labels"]) == len(ex["attention_mask"]) == len(ex["input_ids"])
        assert all(isinstance(t, int) and 0 <= t < len(TOKENIZER) for t in ex["input_ids"])
        assert any(label != data.IGNORE_INDEX for label in ex["labels"][1:])


def _tokenize_or_clear_error(rows: list, fmt: str | None, max_length: int) -> None:
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = data.tokenize_dataset(rows, TOKENIZER, format=fmt, max_length=max_length)
    except ValueError as err:
        message = str(err)
        assert re.search(r"row \d+|all \d+ rows were skipped|rows have columns", message), message
        return
    _check_examples(out, max_length)
    skips = [str(w.message) for w in caught if "skipped" in str(w.message)]
    if len(out) < len(rows):
        assert skips == [f"skipped {len(rows) - len(out)} of {len(rows)} rows" + skips[0].split("rows", 1)[1]]
    else:
        assert not skips


FORMAT_CASES = [*KEYS, "messages"]


@pytest.mark.parametrize("fmt", FORMAT_CASES)
@pytest.mark.parametrize("explicit", [False, True], ids=["detected", "explicit"])
def test_tokenize_any_rows_gives_examples_or_a_row_error(fmt, explicit):
    @SETTINGS
    @given(rows=rows_of(fmt), max_length=st.integers(2, 80))
    @example(rows=[{k: "" for k in KEYS.get(fmt, ["messages"])}], max_length=8)  # all empty
    @example(rows=[{"prompt": "the cat", "completion": None}], max_length=8)  # only a prompt
    @example(rows=[{k: " ".join(["cat"] * 300) for k in KEYS.get(fmt, ["text"])}], max_length=16)  # too long
    @example(rows=[{k: 7 for k in KEYS.get(fmt, ["messages"])}], max_length=8)  # a number
    @example(rows=[{k: ["the"] for k in KEYS.get(fmt, ["messages"])}], max_length=8)  # a list
    @example(rows=[{k: "the \ud800 cat" for k in KEYS.get(fmt, ["text"])}], max_length=8)  # lone surrogate
    @example(rows=[{"messages": [{"role": "assistant", "content": 3}]}], max_length=8)  # content not text
    @example(rows=[{"messages": [{"role": None, "content": "the"}]}], max_length=8)  # role not text
    @example(rows=["the cat", {"text": "the cat"}], max_length=8)  # a row that is not a dict
    @example(rows=[{"text": "the cat", 1: "a"}], max_length=8)  # a non-string column name
    def check(rows, max_length):
        _tokenize_or_clear_error(rows, fmt if explicit else None, max_length)

    check()


# ------------------------------------------------------------------ files


def _encode(rows: list, suffix: str) -> bytes:
    if suffix == ".jsonl":
        return "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8", "surrogatepass")
    if suffix == ".json":
        return json.dumps(rows).encode("utf-8", "surrogatepass")
    lines = ["question,answer"] + [
        ",".join(json.dumps(str(v)) for v in (r.values() if isinstance(r, dict) else [r])) for r in rows
    ]
    return "\n".join(lines).encode("utf-8", "surrogatepass")


@st.composite
def file_bytes(draw, suffix: str) -> bytes:
    raw = _encode(draw(rows_of("question_answer")), suffix)
    for _ in range(draw(st.integers(0, 2))):  # splice in junk: bad UTF-8, NULs, stray quotes/brackets
        junk = draw(
            st.sampled_from(
                [b"\xff", b"\xc3", b"\x00", b'"', b"{", b"]", b",", b"\n", b"\r", b"\xef\xbb\xbf"]
            )
        )
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + junk + raw[at:]
    return raw


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_any_file_loads_or_names_the_file(tmp_path, suffix):
    path = tmp_path / f"data{suffix}"

    @SETTINGS
    @given(raw=file_bytes(suffix))
    @example(raw=b"")
    @example(raw=b"\xff\xfe\x00")
    @example(raw=b'{"question": "the", "answer": "cat"}\n\xff\n')
    @example(raw=b'{"question": "the \\ud800", "answer": "cat"}\n')
    @example(raw=b"[1, 2]")
    @example(raw=b"question,answer\n")
    def check(raw):
        path.write_bytes(raw)
        try:
            rows = data.load_data(path)
        except ValueError as err:
            message = str(err)
            assert str(path) in message, message
            if "invalid" in message or "UTF-8" in message:
                assert re.search(r"line \d+", message), message
            return
        assert isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows)
        _tokenize_or_clear_error(rows, "question_answer", 32)

    check()
