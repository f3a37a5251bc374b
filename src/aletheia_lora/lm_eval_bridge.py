"""Optional bridge to EleutherAI's lm-evaluation-harness (`lm_eval`).

`run_lm_eval` wraps an in-memory causal LM (plain transformers or PEFT) and its tokenizer in lm_eval's
HFLM, runs `lm_eval.simple_evaluate` on built-in tasks or custom task YAMLs from `include_path`,
and returns plain dicts: task -> {metric: float}, with lm_eval's "acc,none" keys cleaned to "acc".
All four lm_eval seeds are fixed, and lm_eval is imported only when the function is called.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

LM_EVAL_PIN = "lm-eval==0.4.13"
INSTALL_HINT = f"pip install 'aletheia-lora[lm-eval]'  (or: pip install '{LM_EVAL_PIN}')"


def _task_list(tasks: list[str] | str) -> list[str]:
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = [t.strip() for t in items if t and t.strip()]
    if not names:
        raise ValueError("no lm-eval tasks given: pass task names, e.g. tasks='arc_easy,hellaswag'")
    return list(dict.fromkeys(names))


def _metric_key(key: str) -> str:
    """lm_eval's "acc,none" -> "acc", "acc_stderr,none" -> "acc_stderr", "em,strict" -> "em/strict"."""
    metric, _, filt = key.partition(",")
    return metric if filt in ("", "none") else f"{metric}/{filt}"


def _clean(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Keep the "metric,filter" entries with numeric values (stderr can be "N/A"); drop name/alias/sample_len."""
    return {
        task: {
            _metric_key(k): float(v)
            for k, v in metrics.items()
            if "," in k and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        for task, metrics in results.items()
    }


_MANAGERS: dict[tuple, Any] = {}


def _task_manager(task_manager_cls, include_path: str | None):
    """lm_eval's TaskManager, reused while ``include_path``'s YAML files are unchanged.

    Building one scans every built-in task YAML (seconds); it only indexes names -> YAML paths and
    re-reads the YAML on each load, so reusing it is safe as long as the set of files is the same.
    """
    key: tuple = (None,)
    if include_path is not None:
        root = Path(include_path).resolve()
        files = sorted((str(p), p.stat().st_mtime_ns) for p in root.rglob("*.y*ml") if p.is_file())
        key = (str(root), tuple(files))
    if key not in _MANAGERS:
        _MANAGERS.clear()
        _MANAGERS[key] = task_manager_cls(include_path=include_path)
    return _MANAGERS[key]


def run_lm_eval(
    model,
    tokenizer,
    tasks: list[str] | str,
    *,
    include_path: str | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Evaluate ``model`` (already loaded, possibly a PEFT model) on lm-eval ``tasks``.

    ``tasks`` is a list or a comma-separated string of lm-eval task/group names (or task YAML paths);
    ``include_path`` is a folder of extra task YAMLs. Returns task -> {metric: value}, numeric values
    only, e.g. ``{"arc_easy": {"acc": 0.61, "acc_stderr": 0.01, "acc_norm": 0.57, ...}}``.
    The model's train/eval mode is restored afterwards.
    """
    names = _task_list(tasks)
    if include_path is not None and not Path(include_path).is_dir():
        raise FileNotFoundError(f"lm-eval include_path is not a folder: {include_path}")
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ImportError(f"lm-eval tasks need lm-evaluation-harness: {INSTALL_HINT}") from err

    manager = _task_manager(TaskManager, include_path)
    known = set(manager.all_tasks)
    unknown = [n for n in names if n not in known and not Path(n).is_file()]
    if unknown:
        where = f" (searched the built-in tasks and {include_path})" if include_path else ""
        raise ValueError(
            f"unknown lm-eval task(s): {', '.join(unknown)}{where}. List the available tasks with "
            "`lm-eval ls tasks` (add `--include_path DIR` for custom ones), or pass include_path= "
            "a folder of task YAMLs."
        )

    was_training = model.training
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=names,
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            log_samples=False,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    finally:
        model.train(was_training)
    if out is None:  # lm_eval returns None on non-zero distributed ranks
        return {}
    return _clean(out["results"])
