"""`LayerScores`: the probe's result, a plain ``dict[int, float]`` with a breakdown attached."""

from __future__ import annotations

import json
import os
from typing import Any

from .io import atomic_write_text


class LayerScores(dict):
    """Layer index -> score (sum over probe batches of per-tensor gradient Frobenius norms).

    Besides the mapping itself it carries:

    * ``modules``: layer -> {block-relative parameter name -> score}, the per-tensor breakdown;
    * ``roles``: layer -> {"attention" | "mlp" | "expert" | "router" | "other" -> subtotal};
    * ``meta``: how the probe ran (``batches``, ``tokens``, ``seconds``, ``method``,
      ``params``, ``seed``, ``dtype``, ``score``: the signal the mapping holds, ...);
    * ``signals``: signal name -> {layer -> score}, every signal the probe computed
      (``grad-norm``, ``relative``, ``lora-energy``, ``coherence``; see ``gradient_probe``),
      the chosen one included. ``with_score(name)`` gives the same result scored by another.

    ``modules`` and ``roles`` break down the chosen signal: per-tensor values that sum to the
    layer score, except for ``coherence``, a ratio, where they are each tensor's and each role's
    own coherence.

    ``to_json()`` / ``from_json()`` round-trip all of it exactly (floats are written with
    ``repr`` precision); JSON written before ``signals`` existed loads with ``signals == {}``.
    """

    def __init__(
        self,
        scores: dict[int, float] | None = None,
        *,
        modules: dict[int, dict[str, float]] | None = None,
        roles: dict[int, dict[str, float]] | None = None,
        meta: dict[str, Any] | None = None,
        signals: dict[str, dict[int, float]] | None = None,
    ) -> None:
        super().__init__({int(k): float(v) for k, v in (scores or {}).items()})
        self.modules = {int(k): dict(v) for k, v in (modules or {}).items()}
        self.roles = {int(k): dict(v) for k, v in (roles or {}).items()}
        self.meta = dict(meta or {})
        self.signals = {
            str(name): {int(k): float(v) for k, v in values.items()}
            for name, values in (signals or {}).items()
        }
        # the contribution warm-up's adapter weights (PEFT state-dict key -> tensor), which the kept
        # layers start from; not part of the JSON (it is weights, not scores)
        self.warmup_state: dict[str, Any] | None = None

    def ranking(self) -> list[int]:
        """Layer indices from highest to lowest score (ties: lower index first)."""
        return sorted(self, key=lambda i: (-self[i], i))

    def with_score(self, name: str) -> LayerScores:
        """The same probe result with signal ``name`` as its scores (a probe that computed it:
        ``gradient_probe(..., signals=[name])`` or ``signals="all"``). The breakdown (``modules``,
        ``roles``) exists only for the signal the probe scored by; for another it is empty."""
        if name not in self.signals:
            raise ValueError(
                f"signal {name!r} was not computed by this probe (it has {sorted(self.signals)}); probe with "
                f"signals=[{name!r}] or signals='all'."
            )
        same = name == self.meta.get("score")
        out = LayerScores(
            self.signals[name],
            modules=self.modules if same else None,
            roles=self.roles if same else None,
            meta=self.meta | {"score": name},
            signals=self.signals,
        )
        out.warmup_state = self.warmup_state
        return out

    def to_dict(self) -> dict[str, Any]:
        data = {
            "scores": {str(k): v for k, v in sorted(self.items())},
            "roles": {str(k): v for k, v in sorted(self.roles.items())},
            "modules": {str(k): v for k, v in sorted(self.modules.items())},
            "meta": self.meta,
        }
        if self.signals:
            data["signals"] = {
                name: {str(k): v for k, v in sorted(values.items())} for name, values in self.signals.items()
            }
        return data

    def to_json(self, path: str | os.PathLike | None = None, *, indent: int | None = 1) -> str:
        """Serialise; with ``path`` also write the file (atomically)."""
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            atomic_write_text(path, text + "\n")
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerScores:
        if "scores" not in data:
            raise ValueError(
                "not a LayerScores object: no 'scores' key (was it written by LayerScores.to_json?)"
            )
        return cls(
            data["scores"],
            modules=data.get("modules"),
            roles=data.get("roles"),
            meta=data.get("meta"),
            signals=data.get("signals"),
        )

    @classmethod
    def from_json(cls, text_or_path: str | os.PathLike) -> LayerScores:
        """Parse JSON text, or read it from a file path."""
        text = text_or_path
        if isinstance(text_or_path, os.PathLike) or not text_or_path.lstrip().startswith("{"):
            with open(text_or_path, encoding="utf-8") as f:
                text = f.read()
        return cls.from_dict(json.loads(text))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LayerScores):
            return dict.__eq__(self, other)
        return (
            dict.__eq__(self, other)
            and self.modules == other.modules
            and self.roles == other.roles
            and self.meta == other.meta
            and self.signals == other.signals
        )

    def __ne__(self, other: object) -> bool:
        return not self == other

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        body = ", ".join(f"{k}: {v:.4g}" for k, v in sorted(self.items()))
        return f"LayerScores({{{body}}})"
