"""``train --push_to_hub``: make sure the Hub repo can be written before anything runs, and upload the
finished adapter folder (adapter, card, ``aletheia.json``, plots, report) with ``huggingface_hub``.

The check comes first so that a run that cannot push fails in seconds, with the reason and the fix,
and leaves the output folder as it was; never after an hour of training with a traceback.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import HfApi, get_token

from .models import offline_reason

# Left out of the upload: resumable checkpoints and the merged full model (large; local use).
NOT_PUSHED = ["checkpoint-*", "checkpoint-*/**", "merged/*", ".*"]


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def prepare_hub_repo(repo_id: str | None, output_dir: str | os.PathLike, *, token: str | None = None,
                     private: bool | None = None) -> str:  # fmt: skip
    """Create (or find) the Hub repo a run will push to, and return its full id (``user/name``).

    ``repo_id`` defaults to the output folder's name, in the token owner's namespace (as the
    Trainer does). Raises ``OSError`` naming the reason and the fix when offline, without a token,
    or when the Hub refuses."""
    repo = repo_id or Path(output_dir).absolute().name
    reason = offline_reason()
    if reason is not None:
        raise OSError(
            f"--push_to_hub: {reason}, so the adapter could not be uploaded to {repo!r}. Train without "
            f"--push_to_hub and upload the folder later (`hf upload {repo} {output_dir}`), or run where the Hub "
            f"is reachable."
        )
    token = token or get_token()
    if not token:
        raise OSError(
            "--push_to_hub: no Hugging Face token; run `hf auth login`, set HF_TOKEN, or pass --hub_token."
        )
    try:
        return HfApi(token=token).create_repo(repo, private=private, exist_ok=True).repo_id
    except Exception as err:  # noqa: BLE001 - any client or network failure becomes one clear line
        raise OSError(
            f"--push_to_hub: the Hub refused to create or open the repo {repo!r} ({_first_line(err)}). Check --hub_model_id "
            f"and that your token may write to that namespace."
        ) from None


def push_folder(repo_id: str, output_dir: str | os.PathLike, *, token: str | None = None) -> str:
    """Upload ``output_dir`` (less :data:`NOT_PUSHED`) to ``repo_id`` in one commit; returns the commit URL."""
    try:
        info = HfApi(token=token or get_token()).upload_folder(
            repo_id=repo_id,
            folder_path=str(output_dir),
            ignore_patterns=NOT_PUSHED,
            commit_message="aletheia-lora: adapter, model card, aletheia.json, plots and report",
        )
    except Exception as err:  # noqa: BLE001 - any client or network failure becomes one clear line
        raise OSError(
            f"--push_to_hub: the upload to {repo_id!r} failed ({_first_line(err)}). The run itself is complete in "
            f"{str(output_dir)!r}; upload it with `hf upload {repo_id} {output_dir}`."
        ) from None
    return info.commit_url


__all__ = ["NOT_PUSHED", "prepare_hub_repo", "push_folder"]
