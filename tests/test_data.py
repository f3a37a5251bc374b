"""Data formats, label masks, collation, the embedded arithmetic task and data loading."""

from __future__ import annotations

import copy
import json
import re
import time

import pytest
import torch
import transformers as T

from aletheia_lora import data, models


@pytest.fixture(scope="module")
def tok():
    """The embedded SmolLM2 tokenizer (with its ChatML template), read from the GGUF once."""
    gguf = models.embedded_gguf_path()
    return models.ensure_pad_token(T.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name))


@pytest.fixture(scope="module")
def plain_tok(tok):
    """The same tokenizer without a chat template."""
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    return plain


def _loss_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t, lab in zip(example["input_ids"], example["labels"]) if lab != -100])


def _prompt_len(example) -> int:
    return next(i for i, lab in enumerate(example["labels"]) if lab != -100)


# ------------------------------------------------------------------ formats


@pytest.mark.parametrize(
    ("columns", "expected"),
    [
        (["text"], "text"),
        (["prompt", "completion"], "prompt_completion"),
        (["question", "answer"], "question_answer"),
        (["messages"], "messages"),
        (["instruction", "input", "output"], "alpaca"),
        (["instruction", "output", "id"], "alpaca"),
        (["messages", "text"], "messages"),
        (["question", "answer", "text"], "question_answer"),
    ],
)
def test_detect_format(columns, expected):
    assert data.detect_format(columns) == expected


def test_detect_format_error_names_columns_and_fix():
    with pytest.raises(ValueError, match=r"\['bar', 'foo'\].*prompt\+completion.*format="):
        data.detect_format(["foo", "bar"])


def test_explicit_format_override_and_aliases(tok):
    rows = [{"question": "Q?", "answer": "A", "text": "some text"}]
    as_text = data.tokenize_dataset(rows, tok, format="text")[0]
    assert as_text["labels"] == as_text["input_ids"]
    as_qa = data.tokenize_dataset(rows, tok, format="question+answer")[0]
    assert as_qa != as_text and -100 in as_qa["labels"]
    with pytest.raises(ValueError, match="format='nope' is unknown"):
        data.tokenize_dataset(rows, tok, format="nope")


def test_question_answer_masks_prompt_and_matches_generation_prompt(tok):
    row = {"question": "Tom has 12 apples and buys 7 more. How many?", "answer": "12 + 7 = 19\n#### 19"}
    ex = data.tokenize_dataset([row], tok)[0]
    n = _prompt_len(ex)
    prompt_ids = data.encode_prompt(data.format_prompt(row["question"], tok), tok)
    assert ex["input_ids"][:n] == prompt_ids  # training prompt == generation prompt, token for token
    assert all(lab == -100 for lab in ex["labels"][:n])
    assert ex["labels"][n:] == ex["input_ids"][n:]
    assert _loss_text(tok, ex) == row["answer"] + tok.eos_token
    assert ex["input_ids"][-1] == tok.eos_token_id
    assert ex["attention_mask"] == [1] * len(ex["input_ids"])
    assert "<|im_start|>assistant\n" in tok.decode(prompt_ids)


def test_plain_prompt_without_chat_template(plain_tok):
    assert data.format_prompt("What is 2 + 2?", plain_tok) == "Question: What is 2 + 2?\nAnswer: "
    ex = data.tokenize_dataset([{"question": "What is 2 + 2?", "answer": "4"}], plain_tok)[0]
    assert plain_tok.decode(ex["input_ids"][: _prompt_len(ex)]) == "Question: What is 2 + 2?\nAnswer: "
    assert _loss_text(plain_tok, ex) == "4" + plain_tok.eos_token


def test_prompt_completion_uses_prompt_verbatim(tok):
    ex = data.tokenize_dataset([{"prompt": "The capital of France is", "completion": " Paris."}], tok)[0]
    assert tok.decode(ex["input_ids"][: _prompt_len(ex)]) == "The capital of France is"
    assert _loss_text(tok, ex) == " Paris." + tok.eos_token


def test_text_format_learns_every_token(tok):
    ex = data.tokenize_dataset([{"text": "one two three"}], tok)[0]
    assert ex["labels"] == ex["input_ids"]
    assert tok.decode(ex["input_ids"]) == "one two three" + tok.eos_token


def test_completion_only_loss_false_learns_prompt_too(tok):
    ex = data.tokenize_dataset([{"question": "Q?", "answer": "A"}], tok, completion_only_loss=False)[0]
    assert ex["labels"] == ex["input_ids"]


def test_alpaca_puts_instruction_and_input_in_prompt(tok):
    row = {"instruction": "Add the numbers.", "input": "3 and 4", "output": "7"}
    ex = data.tokenize_dataset([row], tok)[0]
    prompt = tok.decode(ex["input_ids"][: _prompt_len(ex)])
    assert "Add the numbers.\n\n3 and 4" in prompt
    assert _loss_text(tok, ex) == "7" + tok.eos_token
    no_input = data.tokenize_dataset([{"instruction": "Say hi.", "input": "", "output": "hi"}], tok)[0]
    assert "Say hi.<|im_end|>" in tok.decode(no_input["input_ids"])


MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]


def test_messages_loss_on_every_assistant_turn(tok):
    ex = data.tokenize_dataset([{"messages": MESSAGES}], tok)[0]
    assert tok.decode(ex["input_ids"]) == tok.apply_chat_template(MESSAGES, tokenize=False)
    assert _loss_text(tok, ex) == "Hello!<|im_end|>4<|im_end|>"


def test_messages_without_chat_template(plain_tok):
    ex = data.tokenize_dataset([{"messages": MESSAGES}], plain_tok)[0]
    assert plain_tok.decode(ex["input_ids"]).startswith("system: Be brief.\nuser: Hi\nassistant: Hello!")
    assert _loss_text(plain_tok, ex) == "Hello!<|im_end|>4<|im_end|>"


def test_bad_messages_row_is_an_error(tok):
    with pytest.raises(ValueError, match="row 1: 'messages' must be a list"):
        data.tokenize_dataset([{"messages": MESSAGES}, {"messages": "hello"}], tok)


def test_truncation_and_skipping(tok):
    long_q = {"question": "word " * 200, "answer": "1"}
    short = {"question": "Q?", "answer": "a b c d e f g h i j k l m n o p"}
    with pytest.warns(UserWarning, match=r"skipped 1 of 2 rows.*max_length=40"):
        out = data.tokenize_dataset([long_q, short], tok, max_length=40)
    assert len(out) == 1
    assert all(len(ex["input_ids"]) == len(ex["labels"]) <= 40 for ex in out)
    full = data.tokenize_dataset([short], tok)[0]
    assert out[0]["input_ids"] == full["input_ids"][:40]


def test_all_rows_skipped_and_empty_input_are_errors(tok):
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="all 1 rows were skipped"):
        data.tokenize_dataset([{"question": "word " * 100, "answer": "1"}], tok, max_length=10)
    with pytest.raises(ValueError, match="empty"):
        data.tokenize_dataset([], tok)


# ------------------------------------------------------------------ collation


def test_collate_right_pads():
    batch = [
        {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
        {"input_ids": [8], "attention_mask": [1], "labels": [8]},
    ]
    out = data.DataCollator(pad_token_id=0)(batch)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in out.values())
    assert data.collate([{"input_ids": [1, 2]}], 0)["labels"].tolist() == [[1, 2]]


def test_collator_works_with_trainer(tok, tmp_path):
    config = T.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(config)
    train = data.tokenize_dataset(data.make_arithmetic_task(8, 0)["train"], tok)
    args = T.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = T.Trainer(
        model=model, args=args, train_dataset=train, data_collator=data.DataCollator(tok.pad_token_id)
    )
    result = trainer.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))


# ------------------------------------------------------------------ embedded task


def test_arithmetic_task_is_deterministic_and_disjoint():
    a, b = data.make_arithmetic_task(300, 50, seed=1), data.make_arithmetic_task(300, 50, seed=1)
    assert a == b
    assert data.make_arithmetic_task(300, 50, seed=2) != a
    assert len(a["train"]) == 300 and len(a["test"]) == 50
    train_q = {r["question"] for r in a["train"]}
    assert len(train_q) == 300
    assert not train_q & {r["question"] for r in a["test"]}


def test_arithmetic_answers_are_correct_gsm8k_style():
    task = data.make_arithmetic_task()
    assert len(task["train"]) == 2000 and len(task["test"]) == 200
    for row in task["train"] + task["test"]:
        *steps, final = row["answer"].split("\n")
        assert re.fullmatch(r"#### \d{1,3}", final)
        for step in steps:
            lhs, rhs = step.split(" = ")
            assert eval(lhs) == int(rhs)  # the expressions are "a op b" with small ints
        assert data.extract_final_answer(row["answer"]) == steps[-1].split(" = ")[1]
        assert all(len(n) <= 3 for n in re.findall(r"\d+", row["question"]))


def test_extract_final_answer():
    assert data.extract_final_answer("3 + 4 = 7\n#### 7") == "7"
    assert data.extract_final_answer("#### 1,234") == "1234"
    assert data.extract_final_answer("####-5 then") == "-5"
    assert data.extract_final_answer("the answer is 7") is None


# ------------------------------------------------------------------ loading


ROWS = [{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": "a2"}]


def test_load_embedded_task():
    train = data.load_data(None)
    assert train == data.make_arithmetic_task()["train"]
    assert data.load_data("embedded", split="test") == data.make_arithmetic_task()["test"]
    assert data.load_data(None, split="validation") == data.make_arithmetic_task()["test"]
    with pytest.raises(ValueError, match="no split 'dev2'"):
        data.load_data(None, split="dev2")


def test_load_files_of_every_suffix(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in ROWS))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": ROWS}))
    (tmp_path / "d.csv").write_text("question,answer\nq1,a1\nq2,a2\n")
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    for name in ("d.jsonl", "d.json", "lines.json", "wrapped.json", "d.csv", "d.parquet"):
        assert data.load_data(str(tmp_path / name)) == ROWS, name


def test_load_save_to_disk_folder(tmp_path):
    import datasets

    splits = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:1])}
    )
    splits.save_to_disk(str(tmp_path / "dd"))
    assert data.load_data(str(tmp_path / "dd")) == ROWS
    assert data.load_data(str(tmp_path / "dd"), split="test") == ROWS[:1]
    with pytest.raises(ValueError, match=r"no split 'other'; it has \['test', 'train'\]"):
        data.load_data(str(tmp_path / "dd"), split="other")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "single"))
    assert data.load_data(str(tmp_path / "single")) == ROWS


def test_load_folder_of_split_files(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps(ROWS[0]))
    (tmp_path / "test.jsonl").write_text(json.dumps(ROWS[1]))
    assert data.load_data(str(tmp_path)) == ROWS[:1]
    assert data.load_data(str(tmp_path), split="eval") == ROWS[1:]


def test_a_single_file_has_only_a_train_split(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps(ROWS[0]))
    with pytest.raises(ValueError, match="train_eval_split"):
        data.load_data(str(tmp_path / "d.jsonl"), split="test")


def test_missing_file_names_the_path(tmp_path):
    for name in (str(tmp_path / "nope.jsonl"), "nope.jsonl", "./nope"):
        with pytest.raises(FileNotFoundError, match="no such data file or folder.*nope"):
            data.load_data(name)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.jsonl", "", r"empty\.jsonl: the file has no rows"),
        ("blank.jsonl", "\n  \n", r"blank\.jsonl: the file has no rows"),
        ("empty.csv", "", r"empty\.csv: the file has no rows"),
        ("bad.jsonl", '{"text": "a"}\n{"text": "b"}\n{"text": oops}\n', r"bad\.jsonl, line 3: invalid JSON"),
        ("array.jsonl", '{"text": "a"}\n[1, 2]\n', r"array\.jsonl, line 2: expected a JSON object"),
        ("bad.json", '[{"text": "a"},\n {"text": ]', r"bad\.json, line 2: invalid JSON"),
        ("scalar.json", "42", r"scalar\.json: expected a JSON list"),
        ("bad.csv", "question,answer\nq1,a1\nq2\n", r"bad\.csv, line 3: expected 2 fields"),
        ("bad.parquet", "not parquet", r"bad\.parquet: not a readable Parquet file"),
        ("data.txt", "hello", r"suffix '\.txt'; supported"),
    ],
)
def test_malformed_files_are_value_errors(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=message):
        data.load_data(str(tmp_path / name))


def test_hub_dataset_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(OSError) as err:
        data.load_data("someone/no-such-dataset-xyz")
    assert time.perf_counter() - start < 10
    message = str(err.value)
    assert "someone/no-such-dataset-xyz" in message and "offline" in message
    assert "save_to_disk" in message and "path" in message


def test_train_eval_split():
    rows = list(range(100))
    train, held = data.train_eval_split(rows, 0.1, seed=3)
    assert len(held) == 10 and len(train) == 90
    assert sorted(train + held) == rows and train == sorted(train)
    assert data.train_eval_split(rows, 0.1, seed=3) == (train, held)
    assert data.train_eval_split(rows, 0.1, seed=4)[1] != held
    assert len(data.train_eval_split(rows[:3], 0.05)[1]) == 1
    with pytest.raises(ValueError, match="between 0 and 1"):
        data.train_eval_split(rows, 1.5)
    with pytest.raises(ValueError, match="at least 2"):
        data.train_eval_split(rows[:1])


# --------------------------------------------------------------------------- huge files are read lazily

GOOD = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(20)]
BAD_TAIL = b'{"question": oops}\n\xff\xfe not utf-8\n'


def _good_then_bad(path, suffix: str) -> None:
    if suffix == ".jsonl":
        head = "".join(json.dumps(r) + "\n" for r in GOOD)
    else:
        head = "question,answer\n" + "".join(f"{r['question']},{r['answer']}\n" for r in GOOD)
    path.write_bytes(head.encode() + BAD_TAIL)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_max_rows_never_reads_past_the_rows_it_needs(tmp_path, suffix):
    path = tmp_path / f"d{suffix}"
    _good_then_bad(path, suffix)
    assert data.load_data(path, max_rows=20) == GOOD  # the broken tail is never parsed nor decoded
    assert data.load_data(path, max_rows=3) == GOOD[:3]
    with pytest.raises(ValueError, match=rf"d\{suffix}, line {21 + (suffix == '.csv')}"):
        data.load_data(path)


def test_reading_a_large_file_holds_one_line_at_a_time(tmp_path):
    import tracemalloc

    path = tmp_path / "big.jsonl"
    line = json.dumps({"text": "x" * 10_000}) + "\n"
    path.write_text(line * 3_000)  # 30 MB
    tracemalloc.start()
    try:
        rows = data.load_data(path, max_rows=5)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(rows) == 5 and peak < 1_000_000, peak  # a whole-file read would peak above 30 MB


def test_parquet_and_dataset_folders_honour_max_rows(tmp_path):
    import datasets

    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(100)]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    assert data.load_data(tmp_path / "d.parquet", max_rows=7) == rows[:7]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    assert data.load_data(tmp_path / "ds", max_rows=4) == rows[:4]
    assert data.load_data(None, max_rows=2) == data.make_arithmetic_task()["train"][:2]
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_rows="):
            data.load_data(None, max_rows=bad)


def test_asking_a_single_file_for_a_test_split_reads_nothing(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(BAD_TAIL)  # malformed: reading it would raise a different error
    with pytest.raises(data.MissingSplitError, match="no 'test' split"):
        data.load_data(path, split="test")


def test_training_rows_come_from_the_head_of_a_huge_single_file(tmp_path):
    from aletheia_lora.data import load_rows
    from aletheia_lora.settings import DataSettings

    path = tmp_path / "d.jsonl"
    _good_then_bad(path, ".jsonl")
    train, held_out = load_rows(DataSettings(data=str(path), max_train_samples=10, eval_fraction=0.2), seed=0)
    assert len(train) == 10 and held_out and all(r in GOOD for r in train + held_out)
    assert not {json.dumps(r) for r in train} & {json.dumps(r) for r in held_out}


def test_a_broken_test_split_is_reported_not_replaced_by_held_out_rows(tmp_path):
    from aletheia_lora.data import load_rows
    from aletheia_lora.settings import DataSettings

    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GOOD))
    (tmp_path / "test.jsonl").write_bytes(BAD_TAIL)
    with pytest.raises(ValueError, match=r"test\.jsonl, line 1: invalid JSON"):
        load_rows(DataSettings(data=str(tmp_path)), seed=0)
