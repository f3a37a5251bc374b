"""What every command needs around its run: the output folder, the versions, the machine."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .io import current_umask

PLAN_FILE = "aletheia.json"  # what `train` writes beside the adapter: the plan, the settings, the metrics


def read_run_record(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The ``aletheia.json`` record of a ``train`` run folder, or ``None`` if it has none."""
    path = Path(folder) / PLAN_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def resumable_record(
    path: str | os.PathLike, fingerprint: dict[str, Any], default_of, derived: tuple[str, ...] = ()
) -> dict[str, Any] | None:
    """The record an earlier run wrote to ``path`` (``None`` if none), for ``--resume``.

    Refused (``ValueError`` naming the settings) unless it was written with the same ``fingerprint``;
    a setting absent from an older record ran with its default (``default_of(name)``). The
    ``derived`` keys are dropped: they are recomputed at the end, perhaps by newer code.
    """
    path = Path(path)
    if not path.is_file():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    for key in derived:
        record.pop(key, None)
    old = record.get("settings", {})
    changed = sorted(k for k, v in fingerprint.items() if old.get(k, default_of(k)) != v)
    changed += sorted(set(old) - set(fingerprint))
    if changed:
        raise ValueError(
            f"--resume: {path} was written with other settings ({', '.join(changed)}); use the same "
            f"flags, or a new --output_dir."
        )
    return record


def default_output_dir(command: str) -> str:
    """``runs/<command>-<date>-<time>``: a new folder for a command run without ``--output_dir``."""
    return f"runs/{command}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_output_dir(
    path: str | os.PathLike, *, overwrite: bool, resuming: bool = False, create: bool = True
) -> Path:
    """Refuse a non-empty output directory unless ``overwrite`` (or resuming into it).

    ``create=False`` only checks, so a run that fails before writing leaves nothing behind.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output_dir {str(out)!r} is a file; pass a directory path.")
    if out.is_dir() and any(out.iterdir()) and not (overwrite or resuming):
        raise FileExistsError(
            f"output_dir {str(out)!r} is not empty; pass --overwrite_output_dir to write into it, "
            f"--resume_from_checkpoint to continue the run there, or choose another directory."
        )
    if create:
        out.mkdir(parents=True, exist_ok=True)
    return out


def versions() -> dict[str, str]:
    """Versions of this package, Python, torch, transformers and peft; the platform and device."""
    import peft
    import transformers

    return {
        "aletheia_lora": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "platform": platform.platform(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }


def hardware(device: torch.device) -> dict[str, Any]:
    """The machine: CPU model and cores, GPU name and memory when there is one."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            {
                "gpu": props.name,
                "gpu_memory_bytes": props.total_memory,
                "gpu_capability": f"{props.major}.{props.minor}",
                "gpu_count": torch.cuda.device_count(),
                "cuda": torch.version.cuda,
            }
        )
    return info


def max_rss() -> int | None:
    """Peak resident memory of this process in bytes (``None`` where unknown)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def save_adapter(peft_model, output_dir: Path, *, base_model: str | None = None) -> None:
    """``save_pretrained`` into a temp folder, then move each file into place atomically.

    ``base_model``: what ``adapter_config.json`` names as ``base_model_name_or_path`` (a Hub id, or a
    path), instead of the folder the model was loaded from. PEFT's ``README.md`` is a blank template:
    :func:`aletheia_lora.card.write_card` replaces it."""
    if base_model:
        for config in peft_model.peft_config.values():
            config.base_model_name_or_path = base_model
    tmp = Path(tempfile.mkdtemp(prefix=".adapter-", dir=output_dir))
    try:
        peft_model.save_pretrained(tmp, safe_serialization=True)
        mode = 0o666 & ~current_umask()
        for item in tmp.iterdir():
            os.chmod(item, mode)
            os.replace(item, output_dir / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = [
    "PLAN_FILE",
    "read_run_record",
    "resumable_record",
    "check_output_dir",
    "default_output_dir",
    "hardware",
    "max_rss",
    "save_adapter",
    "versions",
]
