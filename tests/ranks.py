"""The one two-rank launcher of the distributed tests, and the clean ending of every rank script.

``run_two_ranks`` starts a script as ranks 0 and 1 of a gloo job (``RANK``/``WORLD_SIZE``/
``MASTER_ADDR``/``MASTER_PORT``, the ``env://`` rendezvous of ``init_process_group``). It does not
run the script directly: each rank runs ``python tests/ranks.py script.py``, and this module, run
as a program, executes the script as ``__main__`` and then ends the process itself:

* the script finished: wait for the other ranks (``barrier``), ``destroy_process_group()`` if a
  process group is initialised, flush stdout and stderr, ``os._exit(0)``;
* the script raised: its traceback on stderr, flush, ``os._exit(1)``; ``sys.exit(n)`` keeps ``n``.

``os._exit`` skips the interpreter's finalisation. Left to it, a rank that has written all its
results can still abort in C++ static destructors (gloo's worker threads, DeepSpeed's shm op):
"terminate called without an active exception", exit code -6, a failed test with nothing wrong.

Scripts started by another launcher (``torchrun``, ``accelerate launch``) get the same ending by
naming this module as the program and the script as its argument: ``clean_exit_argv(script)``.
"""

from __future__ import annotations

import json
import os
import runpy
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

RUNNER = Path(__file__).resolve()
TESTS = RUNNER.parent
TIMEOUT = 180  # seconds for the whole two-rank job; a hang fails the test instead of stalling the suite
GRACE = 30  # seconds the other rank gets to end on its own once one rank has failed
PORT_TAKEN = ("EADDRINUSE", "Address already in use", "address already in use")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for ``MASTER_PORT``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(**extra: str) -> dict[str, str]:
    """This process's environment for a rank or a launcher: offline, one thread each, plus ``extra``."""
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **extra,
    }


def clean_exit_argv(script: Path | str, *args: str) -> list[str]:
    """The program arguments that make a launcher (``torchrun``, ``accelerate launch``) run ``script``
    through this module: the script as ``__main__``, then the clean ending of every rank."""
    return [str(RUNNER), str(script), *args]


def _launch_once(script: Path, root: Path, env: dict[str, str], timeout: float) -> list[dict]:
    """Start ranks 0 and 1 on a fresh port, wait for both (or kill them), return their exit and output.

    Output goes to files, not pipes, so a rank that writes a lot never blocks on a full pipe while
    the other waits for it in a collective. Once a rank fails, the other gets ``GRACE`` seconds to
    end on its own (an exception shared by the probe ends it at once) and is then killed, as
    ``torchrun`` does; past ``timeout`` every rank still running is killed.
    """
    common = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    logs = [(root / f"rank{r}.stdout", root / f"rank{r}.stderr") for r in range(2)]
    procs, notes = [], ["", ""]
    try:
        for r, (out, err) in enumerate(logs):
            with out.open("w") as stdout, err.open("w") as stderr:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, *clean_exit_argv(script)],
                        env={**env, "RANK": str(r), "LOCAL_RANK": str(r), **common},
                        stdout=stdout,
                        stderr=stderr,
                        text=True,
                    )
                )
        deadline, failed_at = time.monotonic() + timeout, None
        while any(p.poll() is None for p in procs):
            now = time.monotonic()
            if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
                failed_at = now
            for r, p in enumerate(procs):
                if p.returncode is not None:
                    continue
                if now > deadline:
                    notes[r] = f"\n[ranks.py] rank {r} killed: still running after {timeout} s\n"
                elif failed_at is not None and now > failed_at + GRACE:
                    notes[r] = f"\n[ranks.py] rank {r} killed: still running {GRACE} s after a rank failed\n"
                else:
                    continue
                p.kill()
                p.wait()
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [
        {"rc": p.returncode, "stdout": out.read_text(), "stderr": err.read_text() + note}
        for p, (out, err), note in zip(procs, logs, notes)
    ]


def run_two_ranks(
    script_text: str, root: Path, *, env: dict[str, str] | None = None, timeout: float = TIMEOUT
) -> dict:
    """Run ``script_text`` as ranks 0 and 1 (gloo, ``env://`` rendezvous on 127.0.0.1), each through
    this module's clean ending.

    ``script_text`` is formatted with ``tests`` (this folder, for ``from conftest import ...``) and
    ``out`` (``root``); a rank writes its results to ``{out}/rank{rank}.json``. ``env`` adds to
    ``rank_env()``. A launch whose rendezvous port was taken in the meantime is retried on a new
    port (twice at most). Returns ``{"procs": [{"rc", "stdout", "stderr"}] * 2, "results": [...]}``,
    a rank's result being its parsed JSON file or ``None`` when it wrote none.
    """
    script = root / "script.py"
    script.write_text(script_text.format(tests=str(TESTS), out=str(root)))
    files = [root / f"rank{r}.json" for r in range(2)]
    for attempt in range(3):
        for f in files:
            f.unlink(missing_ok=True)
        procs = _launch_once(script, root, rank_env(**(env or {})), timeout)
        if attempt == 2 or not any(s in p["stderr"] for p in procs for s in PORT_TAKEN):
            break
    results = [json.loads(f.read_text()) if f.is_file() else None for f in files]
    return {"procs": procs, "results": results}


def both_ranks_succeed(script_text: str, root: Path, **kwargs) -> list[dict]:
    """``run_two_ranks``, asserting that both ranks exit 0 and wrote their result file; returns the results."""
    run = run_two_ranks(script_text, root, **kwargs)
    for rank, (proc, result) in enumerate(zip(run["procs"], run["results"])):
        assert proc["rc"] == 0, (rank, proc["rc"], proc["stderr"][-4000:])
        assert result is not None, (rank, "wrote no result file", proc["stderr"][-4000:])
    return run["results"]


def _end(code: int) -> None:
    """Flush stdout and stderr and leave at once, skipping the interpreter's finalisation."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a closed or broken stream must not turn the exit code around
            pass
    os._exit(code)


def _end_of_work() -> None:
    """The script finished on this rank: meet the other ranks, destroy the process group, exit 0."""
    dist = sys.modules.get("torch.distributed")  # a script that never imported it started no group
    try:
        if dist is not None and dist.is_available() and dist.is_initialized():
            dist.barrier()  # no rank tears down (or takes the store down) while another still works
            dist.destroy_process_group()
    except BaseException:
        traceback.print_exc()
        _end(1)
    _end(0)


def main(argv: list[str]) -> None:
    """``python ranks.py SCRIPT [ARGS...]``: run ``SCRIPT`` as ``__main__`` with ``ARGS`` as its
    ``sys.argv[1:]``, then end the process (``_end_of_work``, or exit 1 with the traceback)."""
    if not argv:
        print("usage: python ranks.py SCRIPT [ARGS...]", file=sys.stderr)
        _end(2)
    script = os.path.abspath(argv[0])
    sys.argv = [script, *argv[1:]]
    sys.path[0] = os.path.dirname(script)  # as `python SCRIPT` would have it
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as stop:
        if stop.code not in (None, 0):
            if not isinstance(stop.code, int):
                print(stop.code, file=sys.stderr)
            _end(stop.code if isinstance(stop.code, int) else 1)
    except BaseException:
        traceback.print_exc()
        _end(1)
    _end_of_work()


if __name__ == "__main__":
    main(sys.argv[1:])
