"""What is each layer worth? Fine-tune every block alone and measure it: the per-layer utility oracle.

``aletheia-lora oracle`` gives every block ``l`` of a model (or of ``--layers``) a short LoRA
fine-tune of that block alone, with the same data order, seed, steps, learning rate and ranks for
every ``l``, and records the held-out loss drop

    U[l] = loss(base model) - loss(after fine-tuning block l alone)

(mean next-token loss on the held-out rows, tokenized as the training rows), the step time and the
lowest trained layer. It then asks two questions of U:

* **Does a probe signal track it?** One gradient probe on the training rows, every signal the probe
  offers, each ranked against U: Spearman's rho and Kendall's tau-b (ties averaged), a one-sided
  permutation p-value for each, and how much of the oracle's top half the signal's top half holds.
* **Does utility add up?** A few multi-layer selections (``--combos``) are fine-tuned together; their
  loss drop is set against the sum of their layers' U.

Writes ``oracle.json`` (atomically, after every layer: a killed run keeps what it finished and
``--resume true`` reruns nothing of it), ``oracle.md`` and ``oracle.png``.

=================  ===================================================================
``--combos``       layers trained together
=================  ===================================================================
``topK``           the K layers with the highest U (``top3``)
``top-half``       the ``floor(n / 2)`` layers with the highest U (what a 50 % budget would pick)
``lower-half``     the lower half of the stack by depth (the first ``floor(n / 2)`` layers)
``every-other``    layers 0, 2, 4, ... of those measured
``3,7,12``         these layers
``none``           no combos
=================  ===================================================================
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .architecture import find_blocks
from .data import prepare_data
from .evaluation import mean_loss
from .finetune import batch_order, load_base, train_arm
from .io import atomic_write_text
from .plan import run_probe, wrap_with_plan
from .report import new_figure, render_table, save_png
from .runs import check_output_dir, hardware, resumable_record, versions
from .scores import LayerScores
from .settings import (
    SCORES,
    AletheiaConfig,
    DataSettings,
    LoraSettings,
    ModelSettings,
    OutputDirSettings,
    ProbeSettings,
    at_least,
)
from .stats import PERMUTATIONS, kendall_tau_b, permutation_pvalues, spearman

FILES = ("oracle.json", "oracle.md", "oracle.png")
DEFAULT_COMBOS = ("top3", "top-half", "lower-half", "every-other")
_COMBO = re.compile(r"top\d+|top-half|lower-half|every-other|none|\d+(,\d+)+")
DEPTH = "depth (reference)"  # the layer index as a 'signal': does a probe beat 'deeper is better'?


@dataclass(kw_only=True)
class OracleArguments(ModelSettings, DataSettings, ProbeSettings, LoraSettings, OutputDirSettings):
    """Settings of ``aletheia-lora oracle``: the shared model, data, probe, LoRA and output groups, and its
    own. Every field is a flag of the same name. The LoRA group's defaults are the package's: attention
    r=16, MLP r=64, alpha / r = 2."""

    layers: list[int] | None = field(
        default=None, metadata={"help": "Blocks to fine-tune one at a time (default: every block)."}
    )
    combos: list[str] = field(
        default_factory=lambda: list(DEFAULT_COMBOS),
        metadata={"help": "Multi-layer selections trained together, against the sum of their layers' U: "
                  "topK (K highest U), top-half (by U), lower-half (by depth), every-other, a list such as "
                  "3,7,12, or none."},
    )  # fmt: skip
    steps: int = field(default=16, metadata={"help": "Optimizer steps per fine-tune."})
    batch_size: int = field(default=4, metadata={"help": "Examples per step."})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate (linear decay)."})
    warmup_steps: int = field(default=2, metadata={"help": "Linear warm-up steps."})
    seed: int = field(
        default=0, metadata={"help": "Seed of the data order, the held-out split, LoRA init and the probe."}
    )
    eval_batch_size: int = field(default=8, metadata={"help": "Held-out rows per forward pass."})
    probe_seeds: list[int] | None = field(
        default=None,
        metadata={"help": "More probe seeds besides --seed (e.g. 1 2): each probes other batches, and oracle.md "
                  "shows how stable each signal's correlation with U is across them."},
    )  # fmt: skip
    resume: bool = field(
        default=False,
        metadata={"help": "Keep the layers and combos an earlier run with the same settings finished."},
    )

    def _check(self) -> None:
        if not self.output_dir:
            raise ValueError(
                "oracle needs --output_dir: oracle.json is written there after every layer, so that --resume "
                "can continue a run that stopped."
            )
        at_least(self, 1, "steps", "batch_size", "eval_batch_size")
        at_least(self, 0, "warmup_steps")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate={self.learning_rate}; it must be > 0.")
        if self.layers is not None:
            if isinstance(self.layers, int):
                self.layers = [self.layers]
            if not self.layers or min(self.layers) < 0:
                raise ValueError(f"layers={self.layers}; give block indices >= 0 (or leave it out for all).")
            self.layers = sorted(set(self.layers))
        if isinstance(self.probe_seeds, int):
            self.probe_seeds = [self.probe_seeds]
        if isinstance(self.combos, str):
            self.combos = [self.combos]
        bad = [c for c in self.combos if not _COMBO.fullmatch(c)]
        if bad:
            raise ValueError(
                f"combos {bad}: use topK (e.g. top3), top-half, lower-half, every-other, a list such as "
                f"3,7,12, or none."
            )

    def fingerprint(self) -> dict[str, Any]:
        """The settings that change results (what ``--resume`` must match)."""
        skip = {"layers", "combos", "output_dir", "resume", "overwrite_output_dir", "quiet",
                "trust_remote_code", "eval_generate", "probe_seeds"}  # fmt: skip
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}

    @classmethod
    def default_of(cls, name: str) -> Any:
        """A field's default (what a record written before the field existed ran with)."""
        f = cls.__dataclass_fields__[name]
        return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default

    def aletheia_config(self) -> AletheiaConfig:
        """The probe and LoRA groups (and the seed) as the config :func:`plan.wrap_with_plan` takes."""
        groups = [*dataclasses.fields(ProbeSettings), *dataclasses.fields(LoraSettings)]
        return AletheiaConfig(**{f.name: getattr(self, f.name) for f in groups}, seed=self.seed)


# --------------------------------------------------------------------------- rank correlation


def ranking(values: dict[int, float]) -> list[int]:
    """Layers from highest to lowest value (ties: lower index first), as ``LayerScores.ranking``."""
    return sorted(values, key=lambda i: (-values[i], i))


def compare(signal: dict[int, float], utility: dict[int, float], *, seed: int = 0) -> dict[str, Any]:
    """How well ``signal`` ranks layers by ``utility``: rho, tau-b, their p-values, and the top half."""
    layers = sorted(utility)
    x, y = [signal[i] for i in layers], [utility[i] for i in layers]
    k = max(1, len(layers) // 2)
    mine, best = ranking({i: signal[i] for i in layers})[:k], ranking(utility)[:k]
    best_sum = sum(utility[i] for i in best)
    p = permutation_pvalues(x, y, seed=seed)
    return {
        "spearman": spearman(x, y),
        "spearman_p": p["spearman"],
        "kendall": kendall_tau_b(x, y),
        "kendall_p": p["kendall"],
        "n": len(layers),
        "top_half": sorted(mine),
        "top_half_overlap": len(set(mine) & set(best)) / k,
        # utility the signal's top half holds, as a share of the oracle's top half (U assumed additive)
        "top_half_captured": sum(utility[i] for i in mine) / best_sum if best_sum > 0 else None,
    }


# --------------------------------------------------------------------------- combos


def resolve_combos(specs: list[str], utility: dict[int, float]) -> list[tuple[str, list[int]]]:
    """``--combos`` as (name, layers) over the measured layers; selections of fewer than two layers and
    repeats of an earlier selection are left out."""
    measured = sorted(utility)
    ranked, half = ranking(utility), len(measured) // 2
    out: list[tuple[str, list[int]]] = []
    for spec in specs:
        if spec == "none":
            continue
        if spec == "top-half":
            layers = ranked[:half]
        elif spec == "lower-half":
            layers = measured[:half]
        elif spec == "every-other":
            layers = measured[::2]
        elif spec.startswith("top"):
            layers = ranked[: int(spec[3:])]
        else:
            layers = [int(v) for v in spec.split(",")]
            missing = sorted(set(layers) - set(measured))
            if missing:
                raise ValueError(f"combo {spec}: layers {missing} have no U yet; add them to --layers.")
        layers = sorted(set(layers))
        if len(layers) >= 2 and all(layers != seen for _, seen in out):
            out.append((spec, layers))
    return out


# --------------------------------------------------------------------------- fine-tuning


def probe_signals(model, rows: list[dict], config: AletheiaConfig, tokenizer) -> tuple[LayerScores, float]:
    """One gradient probe on ``rows`` with every signal the probe offers (``signals="all"``)."""
    return run_probe(model, rows, config, tokenizer=tokenizer, signals="all")


def digest(value: Any) -> str:
    """A short SHA-256 of ``value``'s JSON: equal digests, equal data."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def fine_tune(
    base, layers: list[int], train_rows, eval_rows, order, config: AletheiaConfig, args: OracleArguments,
    pad: int, base_loss: float,
) -> dict[str, Any]:  # fmt: skip
    """LoRA on ``layers`` of a copy of ``base``, ``order``'s steps, then the held-out loss and its drop."""
    cpu, wall = time.process_time(), time.perf_counter()
    peft_model, plan = wrap_with_plan(copy.deepcopy(base), LayerScores(), layers, config)
    losses, seconds = train_arm(peft_model, train_rows, order, args, pad)
    trained = time.perf_counter()
    after = mean_loss(peft_model, eval_rows, batch_size=args.eval_batch_size, pad_token_id=pad)
    del peft_model
    return {
        "layers": list(layers),
        "lowest_trained_layer": min(layers),
        "trainable_params": plan.trainable_params,
        "utility": base_loss - after,
        "eval_loss": after,
        "steps": len(order),
        "order_digest": digest(order),
        "step_seconds": statistics.median(seconds[1:] or seconds),  # the first step pays for warm-up
        "step_times": seconds,
        "first_loss": losses[0],
        "final_loss": statistics.fmean(losses[-max(1, len(losses) // 8) :]),
        "losses": losses,
        "train_seconds": sum(seconds),
        "eval_seconds": time.perf_counter() - trained,
        "wall_seconds": time.perf_counter() - wall,
        "cpu_seconds": time.process_time() - cpu,
    }


# --------------------------------------------------------------------------- the run


def run_oracle(args: OracleArguments, *, log=print, command: list[str] | None = None) -> dict[str, Any]:
    """Fine-tune every block of ``args.layers`` alone (then ``args.combos``), probe once, compare; write
    oracle.json / oracle.md / oracle.png to ``args.output_dir``."""
    session = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": command, "wall_seconds": 0.0,
               "cpu_seconds": 0.0, "trained": []}  # fmt: skip
    wall0, cpu0 = time.perf_counter(), time.process_time()
    out = Path(args.output_dir)
    previous = _previous(out / "oracle.json", args) if args.resume else None
    if previous is None:
        out = check_output_dir(args.output_dir, overwrite=args.overwrite_output_dir, create=False)
    say = (lambda *a: None) if args.quiet else log
    base, tokenizer, device = load_base(args)
    data = prepare_data(args, tokenizer, args.seed)
    if not data.train or not data.eval:
        raise ValueError(
            f"oracle needs training and held-out rows; after tokenizing, {len(data.train)} training and "
            f"{len(data.eval)} held-out rows are left (raise --max_length or the sample limits)."
        )
    num_layers = find_blocks(base, args.layers_path).num_layers
    layers = args.layers if args.layers is not None else list(range(num_layers))
    if max(layers) >= num_layers:
        raise ValueError(f"layers={layers}: the model has {num_layers} blocks (0-{num_layers - 1}).")
    config = args.aletheia_config()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = batch_order(len(data.train), args.steps, args.batch_size, args.seed)
    rows_digest = digest([[r["input_ids"], r["labels"]] for r in data.train + data.eval])
    record: dict[str, Any] = previous or {
        "settings": args.fingerprint(),
        "model": args.model or "embedded SmolLM2-135M-Instruct",
        "num_layers": num_layers,
        "data": {
            "source": args.data or "embedded arithmetic task",
            "format": data.format,
            "train_rows": len(data.train),
            "eval_rows": len(data.eval),
            "dropped_rows": len(data.train_rows) + len(data.eval_rows) - len(data.train) - len(data.eval),
            "eval_target_tokens": sum(sum(t != -100 for t in r["labels"][1:]) for r in data.eval),
            "digest": rows_digest,
        },
        "lora": {
            "attention_r": config.attention_r or config.r,
            "mlp_r": config.effective_mlp_r,
            "alpha_over_r": config.lora_alpha / config.r,
        },
        "batch_order": order,
        "hardware": hardware(device),
        "versions": versions(),
        "base_loss": None,
        "probe": None,
        "layers": {},
        "combos": [],
        "sessions": [],
    }
    if previous is not None:
        if previous["num_layers"] != num_layers or previous["data"]["digest"] != rows_digest:
            raise ValueError(
                f"--resume: {out / 'oracle.json'} was written for other data or another model (its rows or "
                f"block count differ); use a new --output_dir."
            )
        say(f"resuming: {len(record['layers'])} layers and {len(record['combos'])} combos kept")
    record["sessions"].append(session)

    def write() -> None:
        session["wall_seconds"] = time.perf_counter() - wall0
        session["cpu_seconds"] = time.process_time() - cpu0
        record["wall_seconds"] = sum(s["wall_seconds"] for s in record["sessions"])
        record["cpu_seconds"] = sum(s["cpu_seconds"] for s in record["sessions"])
        record["layers"] = dict(sorted(record["layers"].items(), key=lambda kv: int(kv[0])))
        _write(out, record)

    if record["base_loss"] is None:
        start = time.perf_counter()
        record["base_loss"] = mean_loss(base, data.eval, batch_size=args.eval_batch_size, pad_token_id=pad)
        record["base_eval_seconds"] = time.perf_counter() - start
        say(f"base model: held-out loss {record['base_loss']:.4f} on {len(data.eval)} rows")
        write()
    # a record from before a signal existed is probed again (U does not change; the probe is cheap)
    if record["probe"] is None or set(SCORES) - set(record["probe"].get("signals") or {}):
        scores, seconds = probe_signals(base, data.train, config, tokenizer)
        record["probe"] = scores.to_dict() | {"probe_seconds": seconds}
        say(f"probe: {seconds:.1f} s, signals {sorted(scores.signals) or ['grad-norm']}")
        write()
    others = record.setdefault("probes_by_seed", {})
    for s in args.probe_seeds or []:
        if s != args.seed and set(SCORES) - set((others.get(str(s)) or {}).get("signals") or {}):
            scores, seconds = probe_signals(base, data.train, dataclasses.replace(config, seed=s), tokenizer)
            others[str(s)] = {"signals": scores.to_dict()["signals"], "probe_seconds": seconds}
            say(f"probe (seed {s}): {seconds:.1f} s")
            write()

    todo = [i for i in layers if str(i) not in record["layers"]]
    for n, i in enumerate(todo):
        result = fine_tune(base, [i], data.train, data.eval, order, config, args, pad, record["base_loss"])
        record["layers"][str(i)] = result
        session["trained"].append(i)
        write()
        left = (len(todo) - n - 1) * statistics.fmean(
            record["layers"][str(j)]["wall_seconds"] for j in todo[: n + 1]
        )
        say(f"layer {i}: U {result['utility']:+.4f} (loss {result['eval_loss']:.4f}), step "
            f"{result['step_seconds']:.2f} s, {result['wall_seconds']:.0f} s; about {left / 60:.0f} min of "
            f"layers left")  # fmt: skip
    utility = {i: record["layers"][str(i)]["utility"] for i in layers}
    for name, combo in resolve_combos(args.combos, utility):
        if any(c["layers"] == combo for c in record["combos"]):
            continue
        say(f"combo {name}: layers {combo} ...")
        result = fine_tune(base, combo, data.train, data.eval, order, config, args, pad, record["base_loss"])
        record["combos"].append({"combo": name} | result)
        session["trained"].append(combo)
        write()
    record["analysis"] = analyse(record, seed=args.seed)
    write()
    plot_oracle(record, out / "oracle.png")
    return record | {"table": correlation_table(record), "files": list(FILES), "output_dir": str(out)}


def _previous(path: Path, args: OracleArguments) -> dict[str, Any] | None:
    return resumable_record(path, args.fingerprint(), OracleArguments.default_of, derived=("analysis",))


def _write(out: Path, record: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "oracle.json", json.dumps(record, indent=1, default=str) + "\n")
    atomic_write_text(out / "oracle.md", markdown_report(record))


# --------------------------------------------------------------------------- analysis


def signals_of(record: dict[str, Any]) -> dict[str, dict[int, float]]:
    """The probe's per-layer signals (its own scores as ``grad-norm`` if it recorded no others)."""
    probe = record.get("probe") or {}
    raw = probe.get("signals") or {
        (probe.get("meta") or {}).get("score", "grad-norm"): probe.get("scores", {})
    }
    return {name: {int(k): float(v) for k, v in values.items()} for name, values in raw.items()}


def signals_by_seed(record: dict[str, Any]) -> dict[str, dict[str, dict[int, float]]]:
    """Probe seed -> its signals: the main probe's (``--seed``) and every ``--probe_seeds`` one's."""
    out = {str(record["settings"].get("seed", 0)): signals_of(record)}
    for s, probe in sorted((record.get("probes_by_seed") or {}).items(), key=lambda kv: int(kv[0])):
        out[s] = {
            name: {int(k): float(v) for k, v in values.items()} for name, values in probe["signals"].items()
        }
    return out


def utilities(record: dict[str, Any]) -> dict[int, float]:
    return {int(k): v["utility"] for k, v in record.get("layers", {}).items()}


def analyse(record: dict[str, Any], *, seed: int = 0) -> dict[str, Any]:
    """Each signal (and depth, for reference) against U; each combo's drop against its layers' sum."""
    utility = utilities(record)
    out: dict[str, Any] = {"correlation": {}, "additivity": []}
    if len(utility) >= 2:
        candidates = {**signals_of(record), DEPTH: {i: float(i) for i in utility}}
        for name, values in candidates.items():
            if all(i in values for i in utility):
                out["correlation"][name] = compare(values, utility, seed=seed)
        k = max(1, len(utility) // 2)
        best = sum(utility[i] for i in ranking(utility)[:k])
        out["random_top_half_captured"] = k * statistics.fmean(utility.values()) / best if best > 0 else None
        out["random_top_half_overlap"] = k / len(utility)
        seeded = signals_by_seed(record)
        if len(seeded) > 1:  # each signal's correlation with U, probe seed by probe seed
            layers = sorted(utility)
            for name in out["correlation"]:
                if name == DEPTH:
                    continue
                rho = {
                    s: spearman([sig[name][i] for i in layers], [utility[i] for i in layers])
                    for s, sig in seeded.items()
                    if name in sig and all(i in sig[name] for i in layers)
                }
                values = [v for v in rho.values() if not math.isnan(v)]
                out.setdefault("across_probe_seeds", {})[name] = {
                    "spearman": rho,
                    "mean": statistics.fmean(values) if values else None,
                    "sd": statistics.stdev(values) if len(values) > 1 else None,
                    "min": min(values) if values else None,
                }
    for c in record.get("combos", []):
        if all(i in utility for i in c["layers"]):
            total = sum(utility[i] for i in c["layers"])
            out["additivity"].append({
                "combo": c["combo"], "layers": c["layers"], "joint": c["utility"], "sum_of_singles": total,
                "ratio": c["utility"] / total if total != 0 else None,
                "best_single": max(utility[i] for i in c["layers"]),
            })  # fmt: skip
    return out


# --------------------------------------------------------------------------- report


def _layer_list(layers: list[int]) -> str:
    spans, start = [], None
    for n, x in enumerate(layers):
        start = x if start is None else start
        if n + 1 == len(layers) or layers[n + 1] != x + 1:
            spans.append(f"{start}" if start == x else f"{start}-{x}")
            start = None
    return ",".join(spans)


def _f(value: float | None, spec: str) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _normalised(values: dict[int, float]) -> dict[int, float]:
    top = max((abs(v) for v in values.values()), default=0.0)
    return {i: v / top if top > 0 else 0.0 for i, v in values.items()}


def layer_table(record: dict[str, Any]) -> str:
    utility, signals = utilities(record), signals_of(record)
    names = [n for n in signals if all(i in signals[n] for i in utility)]
    order = {i: r + 1 for r, i in enumerate(ranking(utility))}
    ranks = {n: {i: r + 1 for r, i in enumerate(ranking({i: signals[n][i] for i in utility}))} for n in names}
    norm = {n: _normalised({i: signals[n][i] for i in utility}) for n in names}
    head = ["layer", "U", "U rank", "loss after", "step s", "lowest trained"]
    head += [h for n in names for h in (f"{n} (max 1)", "rank")]
    rows = []
    for i in sorted(utility):
        r = record["layers"][str(i)]
        cells = [i, f"{r['utility']:+.4f}", order[i], f"{r['eval_loss']:.4f}", f"{r['step_seconds']:.3f}"]
        cells += [r["lowest_trained_layer"], *[c for n in names for c in (f"{norm[n][i]:.3f}", ranks[n][i])]]
        rows.append(cells)
    return render_table(head, rows) + "\n"


def correlation_table(record: dict[str, Any]) -> str:
    a = record.get("analysis") or analyse(record)
    head = ["signal", "Spearman ρ", "p", "Kendall τ-b", "p", "top-half overlap", "top-half U captured"]
    rows = [
        [name, _f(c["spearman"], "+.3f"), _f(c["spearman_p"], ".4f"), _f(c["kendall"], "+.3f"),
         _f(c["kendall_p"], ".4f"), _f(c["top_half_overlap"], ".2f"), _f(c["top_half_captured"], ".2f")]
        for name, c in a["correlation"].items()
    ]  # fmt: skip
    if a["correlation"]:
        overlap, captured = a.get("random_top_half_overlap"), a.get("random_top_half_captured")
        rows.append(["random (expected)", "0", "", "0", "", _f(overlap, ".2f"), _f(captured, ".2f")])
    return render_table(head, rows) + "\n"


def seeds_table(record: dict[str, Any]) -> str:
    """Each signal's Spearman correlation with U under every probe seed."""
    a = record.get("analysis") or analyse(record)
    across = a.get("across_probe_seeds") or {}
    seeds = list(signals_by_seed(record))
    head = ["signal", *[f"ρ seed {s}" for s in seeds], "mean", "sd", "min"]
    rows = [
        [name, *[_f(v["spearman"].get(s), "+.3f") for s in seeds], _f(v["mean"], "+.3f"), _f(v["sd"], ".3f"),
         _f(v["min"], "+.3f")]
        for name, v in across.items()
    ]  # fmt: skip
    return render_table(head, rows) + "\n"


def additivity_table(record: dict[str, Any]) -> str:
    a = record.get("analysis") or analyse(record)
    step = {tuple(c["layers"]): c["step_seconds"] for c in record.get("combos", [])}
    head = ["combo", "layers", "lowest trained", "joint drop", "sum of single U", "joint / sum"]
    head += ["best single U", "step s"]
    rows = [
        [e["combo"], _layer_list(e["layers"]), min(e["layers"]), f"{e['joint']:+.4f}",
         f"{e['sum_of_singles']:+.4f}", _f(e["ratio"], ".2f"), f"{e['best_single']:+.4f}",
         f"{step[tuple(e['layers'])]:.3f}"]
        for e in a["additivity"]
    ]  # fmt: skip
    return render_table(head, rows) + "\n"


def markdown_report(record: dict[str, Any]) -> str:
    s, d, hw, lora = record["settings"], record["data"], record.get("hardware", {}), record["lora"]
    probe = record.get("probe") or {}
    utility = utilities(record)
    base, wall, cpu = record.get("base_loss"), record.get("wall_seconds", 0), record.get("cpu_seconds", 0)
    lines = [
        f"# Per-layer utility oracle: {record['model']}",
        "",
        f"Every block fine-tuned alone with LoRA (attention r={lora['attention_r']}, MLP r={lora['mlp_r']}, "
        f"alpha/r={lora['alpha_over_r']:g}): {s['steps']} steps x batch {s['batch_size']}, "
        f"lr {s['learning_rate']} (warm-up {s['warmup_steps']}, linear decay), seed {s['seed']}, the same "
        f"batches for every layer. Data: {d['source']} ({d['format']}), {d['train_rows']} training rows, "
        f"{d['eval_rows']} held-out rows ({d['eval_target_tokens']} target tokens), max {s['max_length']} "
        f"tokens. U = held-out loss of the base model ({_f(base, '.4f')}) - after; higher is better. "
        f"Step time: median, first step excluded. Probe: {probe.get('meta', {}).get('batches', '?')} "
        f"batches of {s['probe_batch_size']} training rows, {s['probe_params']}, "
        f"{_f(probe.get('probe_seconds'), '.1f')} s.",
        "",
        f"Machine: {hw.get('cpu', '?')}, {hw.get('device', '?')}, {hw.get('torch_threads', '?')} threads. "
        f"Time: {wall / 60:.1f} min wall, {cpu / 60:.1f} min CPU (process time, all threads), over "
        f"{len(record.get('sessions', []))} session(s).",
        "",
    ]
    if utility:
        top = ranking(utility)
        lines += [
            f"## Per layer ({len(utility)} of {record['num_layers']})",
            "",
            f"U: mean {statistics.fmean(utility.values()):+.4f}, best layer {top[0]} "
            f"({utility[top[0]]:+.4f}), worst layer {top[-1]} ({utility[top[-1]]:+.4f}). Signals normalised "
            f"to max |value| = 1; rank 1 = highest.",
            "",
            layer_table(record),
        ]
    if len(utility) >= 2:
        lines += [
            "## Does a probe signal track U?",
            "",
            "Rank correlation with U over the measured layers (ties get averaged ranks); p: one-sided "
            f"permutation p-value ({PERMUTATIONS:,} random pairings) of a correlation at least this "
            "positive. Top half: the signal's floor(n/2) highest layers; their overlap with U's top half, "
            "and the U they hold as a share of what U's top half holds (U summed per layer). "
            f"`{DEPTH}` ranks deeper layers higher.",
            "",
            correlation_table(record),
        ]
    if (record.get("analysis") or {}).get("across_probe_seeds"):
        lines += [
            "### Across probe seeds",
            "",
            "The same correlation with U (Spearman ρ) for probes of other seeds, that is of other probe "
            "batches (and, for contribution, another LoRA initialisation); U is the same.",
            "",
            seeds_table(record),
        ]
    if record.get("combos"):
        lines += [
            "## Does utility add up?",
            "",
            "Each combo's layers fine-tuned together (same steps, data and ranks); joint drop against the "
            "sum of their single-layer U. Ratio < 1: the layers' gains overlap; > 1: they reinforce each "
            "other.",
            "",
            additivity_table(record),
        ]
    commands = [x["command"] for x in record.get("sessions", []) if x.get("command")]
    if commands:
        lines += ["Command" + ("s" if len(commands) > 1 else "") + ":", ""]
        lines += ["    " + " ".join(c) for c in commands] + [""]
    return "\n".join(lines)


def plot_oracle(record: dict[str, Any], path: str | Path) -> None:
    """U per layer as bars; each signal a line, its min..max mapped onto U's min..max (a signal that
    tracks U runs along the bar tops); the combos beside, if any."""
    utility, signals = utilities(record), signals_of(record)
    layers = sorted(utility)
    additivity = (record.get("analysis") or analyse(record))["additivity"]
    fig = new_figure((12, 4.8) if additivity else (9, 4.8))
    axes = fig.subplots(1, 2, width_ratios=[3, 1]) if additivity else [fig.subplots()]
    ax = axes[0]
    values = [utility[i] for i in layers]
    ax.bar(layers, values, color=["#4C72B0" if v >= 0 else "#C44E52" for v in values], alpha=0.55,
           label="U = held-out loss drop")  # fmt: skip
    bottom, top = min(values, default=0.0), max(values, default=1.0)
    correlation = (record.get("analysis") or {}).get("correlation", {})
    for n, (name, sig) in enumerate(signals.items()):
        if not all(i in sig for i in layers):
            continue
        lo, hi = min(sig[i] for i in layers), max(sig[i] for i in layers)
        span = (hi - lo) or 1.0
        rho = correlation.get(name, {}).get("spearman")
        label = f"{name} (ρ={rho:+.2f})" if rho is not None and not math.isnan(rho) else name
        ax.plot(
            layers,
            [bottom + (sig[i] - lo) / span * (top - bottom) for i in layers],
            marker="o",
            ms=3,
            lw=1.2,
            color=f"C{n + 1}",
            ls=("-", "--", ":", "-.")[n % 4],  # signals that coincide stay visible
            label=label,
        )
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(layers, [str(i) for i in layers], fontsize=7 if len(layers) > 16 else 9)
    ax.set_xlabel("layer")
    ax.set_ylabel("U; each signal's min..max drawn onto U's min..max")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    if additivity:
        right = axes[1]
        names = [e["combo"] for e in additivity]
        y = list(range(len(names)))
        right.barh(
            [v - 0.2 for v in y], [e["joint"] for e in additivity], height=0.4, label="trained together"
        )
        right.barh([v + 0.2 for v in y], [e["sum_of_singles"] for e in additivity], height=0.4,
                   label="sum of single U")  # fmt: skip
        right.set_yticks(y, names, fontsize=7)
        right.invert_yaxis()
        right.axvline(0, color="k", lw=0.8)
        right.set_xlabel("held-out loss drop")
        right.legend(fontsize=7)
    fig.suptitle(f"Per-layer utility oracle: {record['model']}", fontsize=10)
    save_png(fig, path)


__all__ = [
    "OracleArguments",
    "analyse",
    "compare",
    "correlation_table",
    "resolve_combos",
    "run_oracle",
]
