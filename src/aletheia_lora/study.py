"""Which layer selection actually works? Fine-tune one model several ways and compare, side by side.

``aletheia-lora study`` fine-tunes a model on GSM8K-style data once per *arm* with the same data
order, seed, steps and hyperparameters; the arms differ only in which layers get LoRA (and, for
one arm, the ranks). Every arm is then scored on the task's test split (answer NLL, optional
greedy exact match) and on forgetting suites (general-text NLL, HumanEval-solution NLL, MMLU),
as deltas against the base model. Writes ``study.json`` (after every arm, so a killed run keeps
what it finished and ``--resume`` picks up), ``study.md`` and ``study.png``.

=======================  ==================================================================
arm                      layers
=======================  ==================================================================
``lora-all``             every layer (the baseline)
``top``                  the published rule: ``top`` on ``probe_params="lora-targets"``, uniform r
``top-all-params``       ``top`` on ``probe_params="all"`` (the paper's scoring)
``random-1/2/3``         ``random`` with selection seeds 1, 2, 3 (same budget)
``last``                 the last layers (same budget)
``depth-aware``          ``depth-aware`` (most score per predicted step cost)
``top-asym``             ``top`` with attention r=16, MLP r=64 (the package default since this study)
``depth-aware-asym``     ``depth-aware`` with attention r=16, MLP r=64
``lora-all-asym``        every layer with attention r=16, MLP r=64
``lora-all-equal-time``  every layer, for as many steps as fit in ``top``'s wall-clock
                         (probe included) at ``lora-all``'s measured step time
=======================  ==================================================================

Nothing here looks at the test split before the evaluation: the hyperparameters are fixed in
``StudyArguments`` and the probe reads training rows only.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import get_linear_schedule_with_warmup

from .architecture import find_blocks
from .batches import collate
from .data import load_data, tokenize_dataset
from .io import atomic_write_text
from .models import load_model
from .plan import run_probe, select, wrap_with_plan
from .report import new_figure, render_table, save_png
from .runs import check_output_dir, hardware, versions
from .scores import LayerScores
from .selection import budget
from .settings import AletheiaConfig, BudgetSettings, ModelSettings, OutputDirSettings, at_least
from .suites import (
    general_text_suite,
    gsm8k_suite,
    humaneval_problems,
    humaneval_suite,
    load_mmlu,
    mmlu_suite,
    sample,
)
from .timing import interleaved, optimizer_step

FILES = ("study.json", "study.md", "study.png")
DEFAULT_ARM = "top"
BASELINE = "lora-all"
EQUAL_TIME = "lora-all-equal-time"


@dataclass(frozen=True)
class Arm:
    """One way to choose layers; ``strategy=None`` adapts every layer."""

    name: str
    strategy: str | None
    probe_params: str = "lora-targets"
    seed: int = 0
    attention_r: int | None = None
    mlp_r: int | None = None


ARMS = {
    a.name: a
    for a in (
        Arm(BASELINE, None),
        Arm(DEFAULT_ARM, "top"),
        Arm("top-all-params", "top", probe_params="all"),
        Arm("random-1", "random", seed=1),
        Arm("random-2", "random", seed=2),
        Arm("random-3", "random", seed=3),
        Arm("last", "last"),
        Arm("depth-aware", "depth-aware"),
        Arm("top-asym", "top", attention_r=16, mlp_r=64),
        Arm("depth-aware-asym", "depth-aware", attention_r=16, mlp_r=64),
        Arm("lora-all-asym", None, attention_r=16, mlp_r=64),
        Arm(EQUAL_TIME, None),
    )
}


@dataclass(kw_only=True)
class StudyArguments(ModelSettings, BudgetSettings, OutputDirSettings):
    """Settings of ``aletheia-lora study``: the shared model, budget and output groups, and its own.
    Every field is a flag of the same name."""

    gsm8k_dir: str = field(
        metadata={"help": "Folder with train.jsonl and test.jsonl of {question, answer} rows (GSM8K)."}
    )
    mmlu_dir: str | None = field(
        default=None, metadata={"help": "Folder of MMLU CSVs for the forgetting suite (optional)."}
    )
    text: str | None = field(
        default=None,
        metadata={"help": "English text file for general-text NLL (default: pydoc_data.topics)."},
    )
    arms: list[str] = field(
        default_factory=lambda: list(ARMS),
        metadata={"help": "Arms to run (lora-all always runs).", "choices": list(ARMS)},
    )
    steps: int = field(default=48, metadata={"help": "Optimizer steps per arm."})
    batch_size: int = field(default=4, metadata={"help": "Examples per step."})
    max_length: int = field(default=256, metadata={"help": "Truncate training examples to this many tokens."})
    learning_rate: float = field(default=5e-4, metadata={"help": "AdamW learning rate (linear decay)."})
    warmup_steps: int = field(default=4, metadata={"help": "Linear warm-up steps."})
    r: int = field(default=16, metadata={"help": "LoRA rank (alpha = 2 r) of the uniform-rank arms."})
    probe_batches: int = field(default=5, metadata={"help": "Gradient-probe batches."})
    seed: int = field(default=0, metadata={"help": "Seed of the data order, LoRA init and the probe."})
    test_limit: int = field(default=100, metadata={"help": "GSM8K test questions for the answer NLL."})
    exact_match: int = field(
        default=0, metadata={"help": "GSM8K test questions to answer by greedy decoding (0: none)."}
    )
    max_new_tokens: int = field(default=256, metadata={"help": "Generation budget for exact match."})
    text_windows: int = field(default=8, metadata={"help": "General-text windows of eval_max_length tokens."})
    humaneval_limit: int = field(default=40, metadata={"help": "HumanEval problems (0: skip the suite)."})
    mmlu_limit: int = field(default=100, metadata={"help": "MMLU questions (with --mmlu_dir)."})
    eval_max_length: int = field(default=512, metadata={"help": "Tokens per evaluation example / window."})
    eval_batch_size: int = field(default=8, metadata={"help": "Examples per evaluation forward pass."})
    time_rounds: int = field(
        default=3,
        metadata={"help": "After training: interleaved timing rounds over every arm (0: use the training "
                  "runs' own step times)."},
    )  # fmt: skip
    time_steps: int = field(default=3, metadata={"help": "Timed steps per arm and timing round."})
    resume: bool = field(
        default=False, metadata={"help": "Keep the arms an earlier run with the same settings finished."}
    )

    def _check(self) -> None:
        if not self.output_dir:
            raise ValueError(
                "study needs --output_dir: study.json is written there after every arm, so that --resume can "
                "continue a run that stopped."
            )
        if isinstance(self.arms, str):
            self.arms = [self.arms]
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown:
            raise ValueError(f"unknown arms {unknown}; choose from {list(ARMS)}.")
        wanted = {BASELINE, *self.arms} | ({DEFAULT_ARM} if EQUAL_TIME in self.arms else set())
        self.arms = [a for a in ARMS if a in wanted]  # fixed order: the baseline and default come first
        at_least(
            self,
            1,
            "steps",
            "batch_size",
            "max_length",
            "probe_batches",
            "r",
            "eval_max_length",
            "time_steps",
        )
        at_least(
            self,
            0,
            "test_limit",
            "exact_match",
            "text_windows",
            "humaneval_limit",
            "mmlu_limit",
            "time_rounds",
        )
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate={self.learning_rate}; it must be > 0.")
        folder = Path(self.gsm8k_dir)
        missing = [f for f in ("train.jsonl", "test.jsonl") if not (folder / f).is_file()]
        if missing:
            raise FileNotFoundError(
                f"gsm8k_dir={self.gsm8k_dir!r} lacks {', '.join(missing)}; point it at a folder with "
                f"train.jsonl and test.jsonl of {{question, answer}} rows."
            )

    def fingerprint(self) -> dict[str, Any]:
        """The settings that change results (what ``--resume`` must match)."""
        skip = {"arms", "output_dir", "resume", "overwrite_output_dir", "quiet", "time_rounds", "time_steps",
                "trust_remote_code"}  # fmt: skip
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}

    @classmethod
    def default_of(cls, name: str) -> Any:
        """A field's default (what a record written before the field existed ran with)."""
        f = cls.__dataclass_fields__[name]
        return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


# --------------------------------------------------------------------------- training


def batch_order(n_rows: int, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """Row indices of every step: a seeded permutation, cycled when steps x batch exceeds the rows."""
    perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed)).tolist()
    flat = [perm[i % n_rows] for i in range(steps * batch_size)]
    return [flat[i : i + batch_size] for i in range(0, len(flat), batch_size)]


def train_arm(model: nn.Module, rows: list[dict], order: list[list[int]], args: StudyArguments, pad: int):
    """AdamW with linear warm-up and decay, gradient clipping at 1.0; returns (losses, step seconds)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=0.0)
    schedule = get_linear_schedule_with_warmup(optimizer, args.warmup_steps, len(order))
    device = next(model.parameters()).device
    losses, seconds = [], []
    model.train()
    for step, indices in enumerate(order):
        batch = {k: v.to(device) for k, v in collate([rows[i] for i in indices], pad).items()}
        try:
            loss, took = optimizer_step(model, optimizer, batch, clip=1.0, schedule=schedule)
        except FloatingPointError as err:
            raise FloatingPointError(f"step {step}: {err}") from None
        seconds.append(took)
        losses.append(loss.item())
    return losses, seconds


# --------------------------------------------------------------------------- evaluation


def load_eval_inputs(args: StudyArguments) -> dict[str, Any]:
    """Each suite's items, drawn once (seeded) so every arm and the base see the same ones."""
    test = load_data(str(Path(args.gsm8k_dir) / "test.jsonl"))
    inputs: dict[str, Any] = {"gsm8k": sample(test, args.test_limit, args.seed) if args.test_limit else []}
    inputs["gsm8k_generate"] = sample(test, args.exact_match, args.seed) if args.exact_match else []
    inputs["text"] = Path(args.text).read_text(encoding="utf-8") if args.text else None
    inputs["humaneval"] = (
        sample(humaneval_problems(), args.humaneval_limit, args.seed) if args.humaneval_limit else []
    )
    inputs["mmlu"] = (
        sample(load_mmlu(args.mmlu_dir), args.mmlu_limit, args.seed)
        if args.mmlu_dir and args.mmlu_limit
        else []
    )
    return inputs


def evaluate(model: nn.Module, tokenizer, inputs: dict[str, Any], args: StudyArguments) -> dict[str, float]:
    """Flat metrics: gsm8k_nll, gsm8k_exact_match, text_nll, humaneval_nll, mmlu_accuracy, mmlu_loglik."""
    common = {"max_length": args.eval_max_length, "batch_size": args.eval_batch_size}
    out: dict[str, float] = {}
    if inputs["gsm8k"]:
        out["gsm8k_nll"] = gsm8k_suite(model, tokenizer, inputs["gsm8k"], **common)["nll"]
    if inputs["gsm8k_generate"]:
        em = gsm8k_suite(model, tokenizer, inputs["gsm8k_generate"], generate=True,
                         max_new_tokens=args.max_new_tokens, **common)  # fmt: skip
        out["gsm8k_exact_match"] = em["exact_match"]
    if args.text_windows:
        text = general_text_suite(
            model, tokenizer, inputs["text"], limit=args.text_windows, seed=args.seed, **common
        )
        out["text_nll"] = text["nll"]
    if inputs["humaneval"]:
        out["humaneval_nll"] = humaneval_suite(model, tokenizer, problems=inputs["humaneval"], **common)[
            "nll"
        ]
    if inputs["mmlu"]:
        mmlu = mmlu_suite(model, tokenizer, inputs["mmlu"], max_length=args.eval_max_length)
        out["mmlu_accuracy"], out["mmlu_loglik"] = mmlu["accuracy"], mmlu["loglik"]
    return out


# --------------------------------------------------------------------------- timing


def time_arms(base, tokenizer, arms: list[dict], rows, order, args: StudyArguments, log) -> dict[str, Any]:
    """Step times of every trained arm, measured side by side: each arm wrapped once, one warm-up step,
    then ``time_rounds`` interleaved rounds (``timing.interleaved``) of ``time_steps`` steps on the same
    batches."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(base.parameters()).device
    batches = [{k: v.to(device) for k, v in collate([rows[i] for i in step], pad).items()}
               for step in order[: args.time_steps]]  # fmt: skip
    models = {}
    for a in arms:
        config = _config(ARMS[a["arm"]], args)
        dummy = LayerScores({i: 1.0 for i in range(len(a["selected_layers"]))})
        model, _ = wrap_with_plan(copy.deepcopy(base), dummy, a["selected_layers"], config)
        params = [p for p in model.parameters() if p.requires_grad]
        models[a["arm"]] = (model.train(), torch.optim.AdamW(params, lr=args.learning_rate))

    def step(name: str, batch: dict) -> float:
        return optimizer_step(*models[name], batch)[1]

    names = list(models)
    for name in names:  # warm-up
        step(name, batches[0])
    seconds: dict[str, list[float]] = {name: [] for name in names}

    def run(name: str, rnd: int) -> None:
        seconds[name] += [step(name, batch) for batch in batches]
        if sum(map(len, seconds.values())) == (rnd + 1) * len(names) * len(batches):
            log(f"timing round {rnd + 1}/{args.time_rounds} done")

    interleaved(names, args.time_rounds, run)
    return {
        "rounds": args.time_rounds,
        "steps_per_round": args.time_steps,
        "step_seconds": seconds,
        "median_seconds": {name: statistics.median(times) for name, times in seconds.items()},
    }


# --------------------------------------------------------------------------- the study


def _config(arm: Arm, args: StudyArguments) -> AletheiaConfig:
    strategy = arm.strategy or "top"
    return AletheiaConfig(
        top_pct=args.top_pct,
        top_k=args.top_k,
        target_speedup=args.target_speedup if strategy == "depth-aware" else None,
        strategy=strategy,
        probe_params=arm.probe_params,
        probe_batches=args.probe_batches,
        r=args.r,
        lora_alpha=2 * args.r,
        attention_r=arm.attention_r,
        mlp_r=arm.mlp_r,
        mlp_rank_factor=1,  # the arms name their ranks: uniform r unless mlp_r is given
        seed=args.seed,  # probe order and LoRA init: the same for every arm
    )


def run_arm(
    base, tokenizer, arm: Arm, rows, order, inputs, args: StudyArguments, probes: dict
) -> dict[str, Any]:
    """Select (one probe per scoring, shared by the arms that use it), wrap, train, evaluate."""
    model = copy.deepcopy(base)
    config = _config(arm, args)
    if arm.probe_params not in probes:
        probes[arm.probe_params] = run_probe(model, rows, config, tokenizer=tokenizer)
    scores, probe_seconds = probes[arm.probe_params]
    if arm.strategy is None:
        selected = list(range(find_blocks(model).num_layers))
    else:
        selected = select(scores, config, model=model, seed=arm.seed)
    probed = arm.strategy in ("top", "depth-aware")  # the arms that pay for the probe
    peft_model, plan = wrap_with_plan(model, scores, selected, config, probe_seconds=probe_seconds)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    losses, seconds = train_arm(peft_model, rows, order, args, pad)
    peft_model.eval()
    metrics = evaluate(peft_model, tokenizer, inputs, args)
    steady = seconds[1:] or seconds  # the first step pays for warm-up
    probe_seconds = probe_seconds if probed else 0.0
    return {
        "arm": arm.name,
        "strategy": arm.strategy or "all",
        "probe_params": arm.probe_params if probed else None,
        "selection_seed": arm.seed if arm.strategy == "random" else None,
        "attention_r": arm.attention_r,
        "mlp_r": arm.mlp_r,
        "selected_layers": selected,
        "trainable_params": plan.trainable_params,
        "predicted_speedup": plan.predicted_speedup,
        "steps": len(order),
        "step_seconds": statistics.median(steady),
        "train_seconds": sum(seconds),
        "probe_seconds": probe_seconds,
        "wall_seconds": sum(seconds) + probe_seconds,
        "first_loss": losses[0],
        "final_loss": statistics.fmean(losses[-max(1, len(losses) // 8) :]),
        "losses": losses,
        "metrics": metrics,
    }


def _deltas(arm: dict, base: dict) -> dict[str, float]:
    return {k: v - base[k] for k, v in arm["metrics"].items() if k in base}


def summarize(record: dict[str, Any]) -> dict[str, Any]:
    """Derived comparisons: speedups against lora-all, deltas against the base, and the answers."""
    arms = {a["arm"]: a for a in record["arms"]}
    base = record["base"]
    ref = arms.get(BASELINE)
    for a in arms.values():
        a["delta"] = _deltas(a, base)
        if ref:
            a["measured_speedup"] = _step_seconds(record, ref) / _step_seconds(record, a)
            if "gsm8k_nll" in a["metrics"]:
                a["gsm8k_nll_vs_all"] = a["metrics"]["gsm8k_nll"] / ref["metrics"]["gsm8k_nll"] - 1
    return answers(arms)


def _step_seconds(record: dict[str, Any], arm: dict) -> float:
    """An arm's step time: from the side-by-side timing when there is one, else its training run's."""
    timed = (record.get("timing") or {}).get("median_seconds", {})
    name = BASELINE if arm["arm"] == EQUAL_TIME else arm["arm"]  # the same layers and ranks
    return timed.get(name, arm["step_seconds"])


def _nll(arm: dict | None) -> float | None:
    return arm["metrics"].get("gsm8k_nll") if arm else None


def _targets(arm: dict, ref: dict, versus_random: dict | None, all_asym: dict | None) -> dict[str, Any]:
    """The issue's targets for one arm: test NLL within 3% of all-layer LoRA at equal steps, no worse
    than the random arms' mean, and forgetting no worse than all-layer LoRA's."""
    # a forgetting suite where the arm ends worse than all-layer LoRA (NLL higher, accuracy lower)
    worse = {
        k: arm["delta"][k] - ref["delta"][k]
        for k in ("text_nll", "humaneval_nll")
        if k in arm["delta"] and arm["delta"][k] > ref["delta"][k]
    }
    if "mmlu_accuracy" in arm["delta"] and arm["delta"]["mmlu_accuracy"] < ref["delta"]["mmlu_accuracy"]:
        worse["mmlu_accuracy"] = arm["delta"]["mmlu_accuracy"] - ref["delta"]["mmlu_accuracy"]
    vs_all = _nll(arm) / _nll(ref) - 1
    out = {
        "vs_all": vs_all,
        "within_3pct_of_all": vs_all <= 0.03,
        "no_worse_than_random_mean": _nll(arm) <= versus_random["random_mean"] if versus_random else None,
        "worse_than_all_on": worse,  # by how much
        "worse_than_base_on": {
            k: v for k, v in arm["delta"].items() if (v > 0 if k.endswith("nll") else v < 0)
        },
    }
    if all_asym is not None and arm.get("mlp_r"):  # the same ranks on every layer
        out["vs_all_same_ranks"] = _nll(arm) / _nll(all_asym) - 1
    return out


def answers(arms: dict[str, dict]) -> dict[str, Any]:
    """The study's questions, answered from the numbers (None where an arm needed was not run)."""
    out: dict[str, Any] = {}
    top, ref, equal = arms.get(DEFAULT_ARM), arms.get(BASELINE), arms.get(EQUAL_TIME)
    randoms = [a for name, a in arms.items() if name.startswith("random-")]
    if top and randoms and _nll(top) is not None:
        values = [_nll(a) for a in randoms]
        out["top_vs_random"] = {
            "top_nll": _nll(top),
            "random_mean": statistics.fmean(values),
            "random_min": min(values),
            "random_max": max(values),
            "random_sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "beats_every_seed": _nll(top) < min(values),
            "beats_mean": _nll(top) <= statistics.fmean(values),
        }
        for metric in ("text_nll", "humaneval_nll"):
            if metric in top["delta"] and all(metric in a["delta"] for a in randoms):
                out["top_vs_random"][f"{metric}_delta_top"] = top["delta"][metric]
                out["top_vs_random"][f"{metric}_delta_random_mean"] = statistics.fmean(
                    a["delta"][metric] for a in randoms
                )
    if top and ref and _nll(top) is not None:
        out["top_vs_all_equal_steps"] = _nll(top) / _nll(ref) - 1
        if equal:
            out["top_vs_all_equal_time"] = _nll(top) / _nll(equal) - 1
            out["equal_time_steps"] = equal["steps"]
    if top and "top-all-params" in arms:
        out["lora_targets_vs_all_params"] = {
            "lora-targets": _nll(top),
            "all": _nll(arms["top-all-params"]),
            "same_layers": top["selected_layers"] == arms["top-all-params"]["selected_layers"],
        }
    if top and "depth-aware" in arms:
        da = arms["depth-aware"]
        out["depth_aware"] = {
            "nll_vs_top": _nll(da) / _nll(top) - 1,
            "speedup": da.get("measured_speedup"),
            "top_speedup": top.get("measured_speedup"),
            "layers": da["selected_layers"],
        }
    asym, all_asym = arms.get("top-asym"), arms.get("lora-all-asym")
    if asym and top:
        out["asymmetric_ranks"] = {
            "top_asym_nll": _nll(asym),
            "vs_top": _nll(asym) / _nll(top) - 1,
            "vs_all": _nll(asym) / _nll(ref) - 1 if ref else None,
            "vs_all_asym": _nll(asym) / _nll(all_asym) - 1 if all_asym else None,
            "all_asym_vs_all": _nll(all_asym) / _nll(ref) - 1 if all_asym and ref else None,
            "speedup": asym.get("measured_speedup"),
        }
    if asym and "depth-aware-asym" in arms:
        da = arms["depth-aware-asym"]
        out["depth_aware_asym"] = {
            "nll_vs_top_asym": _nll(da) / _nll(asym) - 1,
            "vs_all": _nll(da) / _nll(ref) - 1 if ref else None,
            "speedup": da.get("measured_speedup"),
            "top_asym_speedup": asym.get("measured_speedup"),
            "layers": da["selected_layers"],
        }
    if ref:
        # the targets, for the uniform-rank default of the published rule and for the asymmetric one
        out["targets"] = {}
        for name, arm in ((DEFAULT_ARM, top), ("top-asym", asym)):
            if arm is not None:
                out["targets"][name] = _targets(arm, ref, out.get("top_vs_random"), all_asym)
    return out


def run_study(args: StudyArguments, *, log=print, command: list[str] | None = None) -> dict[str, Any]:
    """Run every arm of ``args`` and write study.json / study.md / study.png to ``args.output_dir``."""
    out = Path(args.output_dir)
    previous = _previous(out / "study.json", args) if args.resume else None
    if previous is None:
        out = check_output_dir(args.output_dir, overwrite=args.overwrite_output_dir, create=False)
    say = (lambda *a: None) if args.quiet else log
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base, tokenizer = load_model(
        args.model,
        device=str(device) if device.type == "cuda" else None,
        dtype=args.torch_dtype_name,
        trust_remote_code=args.trust_remote_code,
    )
    base.eval()
    train = load_data(str(Path(args.gsm8k_dir) / "train.jsonl"))
    # Rows whose prompt fills max_length have nothing to learn and are dropped (tokenize_dataset
    # warns with the count); longer answers are cut at max_length.
    rows = tokenize_dataset(train, tokenizer, format="question_answer", max_length=args.max_length)
    data = {
        "train_rows": len(train),
        "dropped_rows": len(train) - len(rows),
        "truncated_rows": sum(len(r["input_ids"]) >= args.max_length for r in rows),
    }
    # twice the steps: the equal-time arm may run longer than the others (the order is prefix-stable)
    order = batch_order(len(rows), 2 * args.steps, args.batch_size, args.seed)
    inputs = load_eval_inputs(args)
    record: dict[str, Any] = previous or {
        "settings": args.fingerprint(),
        "model": args.model or "embedded SmolLM2-135M-Instruct",
        "num_layers": None,
        "data": data,
        "budget_layers": None,
        "hardware": hardware(device),
        "versions": versions(),
        "command": command,
        "base": None,
        "arms": [],
    }

    def write() -> None:
        _write(out, record)

    if record["base"] is None:
        say("evaluating the base model ...")
        start = time.perf_counter()
        record["base"] = evaluate(base, tokenizer, inputs, args)
        record["base_eval_seconds"] = time.perf_counter() - start
        write()
    probes: dict = {}

    def train(name: str, arm_order: list[list[int]]) -> None:
        say(f"{name}: training {len(arm_order)} steps ...")
        start = time.perf_counter()
        result = run_arm(base, tokenizer, ARMS[name], rows, arm_order, inputs, args, probes)
        result["seconds"] = time.perf_counter() - start
        record["arms"].append(result)
        say(f"{name}: layers {result['selected_layers']}, step {result['step_seconds']:.2f} s, "
            f"GSM8K NLL {result['metrics'].get('gsm8k_nll', float('nan')):.4f}")  # fmt: skip
        write()

    done = lambda name: any(a["arm"] == name for a in record["arms"])  # noqa: E731
    for name in args.arms:
        if name != EQUAL_TIME and not done(name):
            train(name, order[: args.steps])
        elif name != EQUAL_TIME:
            say(f"{name}: kept from the earlier run")
    record["num_layers"] = len(next(a for a in record["arms"] if a["arm"] == BASELINE)["selected_layers"])
    trained = [a for a in record["arms"] if a["arm"] != EQUAL_TIME]
    timed = set((record.get("timing") or {}).get("median_seconds", {}))
    if args.time_rounds and timed != {a["arm"] for a in trained}:
        say(f"timing {len(trained)} arms side by side ...")
        record["timing"] = time_arms(base, tokenizer, trained, rows, order, args, say)
        write()
    if EQUAL_TIME in args.arms and not done(EQUAL_TIME):
        # as many all-layer steps as fit in the default arm's wall-clock, probe included
        top = next(a for a in record["arms"] if a["arm"] == DEFAULT_ARM)
        all_layers = next(a for a in record["arms"] if a["arm"] == BASELINE)
        wall = top["probe_seconds"] + args.steps * _step_seconds(record, top)
        steps = math.floor(wall / _step_seconds(record, all_layers))
        train(EQUAL_TIME, order[: max(1, min(steps, len(order)))])
    record["budget_layers"] = budget(record["num_layers"], args.top_pct)
    for params, (scores, seconds) in probes.items():  # the probe(s) this run made
        record.setdefault("scores", {})[params] = {"scores": dict(scores), "probe_seconds": seconds}
    record["answers"] = summarize(record)
    write()
    plot_study(record, out / "study.png")
    return record | {"table": markdown_table(record), "files": list(FILES), "output_dir": str(out)}


def _previous(path: Path, args: StudyArguments) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    record.pop("answers", None)  # derived, recomputed at the end (perhaps by newer code)
    old = record.get("settings", {})
    # a setting absent from an older record ran with its default
    changed = sorted(
        k for k, v in args.fingerprint().items() if old.get(k, StudyArguments.default_of(k)) != v
    )
    changed += sorted(set(old) - set(args.fingerprint()))
    if changed:
        raise ValueError(
            f"--resume: {path} was written with other settings ({', '.join(changed)}); use the same "
            f"flags, or a new --output_dir."
        )
    return record


def _write(out: Path, record: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "study.json", json.dumps(record, indent=1, default=str) + "\n")
    atomic_write_text(out / "study.md", markdown_report(record))


# --------------------------------------------------------------------------- report

_COLUMNS = (
    ("gsm8k_nll", "GSM8K test NLL", "{:.4f}"),
    ("gsm8k_exact_match", "GSM8K EM", "{:.3f}"),
)
_FORGET = (
    ("text_nll", "text NLL Δ", "{:+.4f}"),
    ("humaneval_nll", "HumanEval NLL Δ", "{:+.4f}"),
    ("mmlu_accuracy", "MMLU acc Δ", "{:+.3f}"),
    ("mmlu_loglik", "MMLU loglik Δ", "{:+.4f}"),
)


def _layers(layers: list[int]) -> str:
    spans, start = [], None
    for i, x in enumerate(layers):
        if start is None:
            start = x
        if i + 1 == len(layers) or layers[i + 1] != x + 1:
            spans.append(f"{start}" if start == x else f"{start}-{x}")
            start = None
    return ",".join(spans)


def markdown_table(record: dict[str, Any]) -> str:
    base = record.get("base") or {}
    metric_cols = [c for c in _COLUMNS if c[0] in base]
    forget_cols = [c for c in _FORGET if c[0] in base]
    head = ["arm", "layers", "trainable", *[c[1] for c in metric_cols], "vs all",
            *[c[1] for c in forget_cols], "speedup", "predicted", "steps", "probe s", "wall s"]  # fmt: skip
    base_cells = ["base model", "-", "0", *[c[2].format(base[c[0]]) for c in metric_cols], "",
                  *["" for _ in forget_cols], "", "", "0", "", ""]  # fmt: skip
    rows = [base_cells]
    for a in record.get("arms", []):
        m, d = a["metrics"], a.get("delta") or _deltas(a, base)
        vs = a.get("gsm8k_nll_vs_all")
        cells = [
            f"**{a['arm']}**" if a["arm"] == DEFAULT_ARM else a["arm"],
            _layers(a["selected_layers"]),
            f"{a['trainable_params'] / 1e6:.2f}M",
            *[c[2].format(m[c[0]]) if c[0] in m else "" for c in metric_cols],
            f"{vs:+.1%}" if vs is not None else "",
            *[c[2].format(d[c[0]]) if c[0] in d else "" for c in forget_cols],
            f"{a['measured_speedup']:.2f}x" if "measured_speedup" in a else "",
            f"{a['predicted_speedup']:.2f}x" if a.get("predicted_speedup") else "",
            str(a["steps"]),
            f"{a['probe_seconds']:.1f}",
            f"{a['probe_seconds'] + a['steps'] * _step_seconds(record, a):.0f}",
        ]
        rows.append(cells)
    return render_table(head, rows) + "\n"


def _answer_lines(ans: dict[str, Any]) -> list[str]:
    lines = []
    r = ans.get("top_vs_random")
    if r:
        verdict = (
            "beats every random seed"
            if r["beats_every_seed"]
            else (
                "beats the random mean but not every seed"
                if r["beats_mean"]
                else "does not beat the random mean"
            )
        )
        lines.append(
            f"- **Gradient-guided vs random (same budget):** `top` test NLL {r['top_nll']:.4f}; random "
            f"mean {r['random_mean']:.4f} (seeds {r['random_min']:.4f}-{r['random_max']:.4f}, sd "
            f"{r['random_sd']:.4f}): `top` {verdict}."
        )
        if "text_nll_delta_top" in r:
            lines.append(
                f"  Forgetting, text NLL Δ: top {r['text_nll_delta_top']:+.4f} vs random mean "
                f"{r['text_nll_delta_random_mean']:+.4f}."
            )
    if "top_vs_all_equal_steps" in ans:
        line = f"- **vs all-layer LoRA:** at equal steps `top` is {ans['top_vs_all_equal_steps']:+.1%} in test NLL"
        if "top_vs_all_equal_time" in ans:
            line += (
                f"; at equal wall-clock (all-layer gets {ans['equal_time_steps']} steps in the time `top` "
                f"takes, probe included) {ans['top_vs_all_equal_time']:+.1%}"
            )
        lines.append(line + ".")
    p = ans.get("lora_targets_vs_all_params")
    if p:
        lines.append(
            f"- **Probe scoring:** `lora-targets` {p['lora-targets']:.4f} vs `all` {p['all']:.4f}"
            + (" (the same layers were selected)" if p["same_layers"] else "")
            + "."
        )
    da = ans.get("depth_aware")
    if da:
        lines.append(
            f"- **Depth-aware:** layers {_layers(da['layers'])}, measured speedup "
            f"{da['speedup']:.2f}x (top: {da['top_speedup']:.2f}x), test NLL {da['nll_vs_top']:+.1%} vs `top`."
        )
    r = ans.get("asymmetric_ranks")
    if r:
        line = (
            f"- **Asymmetric ranks (attention 16 / MLP 64):** `top-asym` test NLL {r['top_asym_nll']:.4f}, "
            f"{r['vs_top']:+.1%} vs `top` (uniform r=16, same layers)"
        )
        if r["vs_all"] is not None:
            line += f", {r['vs_all']:+.1%} vs all-layer r=16"
        if r["vs_all_asym"] is not None:
            line += f", {r['vs_all_asym']:+.1%} vs all-layer at the same ranks"
        lines.append(
            line + (f"; measured speedup {r['speedup']:.2f}x over all-layer r=16." if r["speedup"] else ".")
        )
    d = ans.get("depth_aware_asym")
    if d:
        line = (
            f"- **Depth-aware at the default ranks:** layers {_layers(d['layers'])}, test NLL "
            f"{d['nll_vs_top_asym']:+.1%} vs `top-asym`"
        )
        if d["vs_all"] is not None:
            line += f" ({d['vs_all']:+.1%} vs all-layer r=16)"
        if d["speedup"] and d["top_asym_speedup"]:
            line += (
                f"; measured speedup {d['speedup']:.2f}x against `top-asym`'s {d['top_asym_speedup']:.2f}x"
            )
        lines.append(line + ".")
    for name, t in (ans.get("targets") or {}).items():
        worse = ", ".join(f"{k} ({v:+.4f})" for k, v in t["worse_than_all_on"].items()) or "nothing"
        forgot = ", ".join(f"{k} ({v:+.4f})" for k, v in t["worse_than_base_on"].items()) or "nothing"
        same = (
            f" ({t['vs_all_same_ranks']:+.1%} vs all-layer at the same ranks)"
            if "vs_all_same_ranks" in t
            else ""
        )
        lines.append(
            f"- **Targets, `{name}`:** test NLL {t['vs_all']:+.1%} vs all-layer r=16{same}: within 3%: "
            f"{t['within_3pct_of_all']}; no worse than the random mean: {t['no_worse_than_random_mean']}; "
            f"forgetting suites where it ends worse than all-layer LoRA: {worse}; worse than the base model "
            f"(forgot) on: {forgot}."
        )
    return lines


def markdown_report(record: dict[str, Any]) -> str:
    s = record["settings"]
    hw = record.get("hardware", {})
    t = record.get("timing")
    timing = (
        f"measured side by side after training ({t['rounds']} interleaved rounds of {t['steps_per_round']} "
        f"steps per arm on the same batches)"
        if t
        else "from each arm's own training run"
    )
    lines = [
        f"# Layer-selection study: {record['model']}",
        "",
        f"GSM8K train, {s['steps']} steps x batch {s['batch_size']} (max {s['max_length']} tokens), lr "
        f"{s['learning_rate']}, r={s['r']}, budget {s['top_pct']}% of layers, seed {s['seed']}; test NLL on "
        f"{s['test_limit']} GSM8K test questions. Forgetting Δ = arm - base model (NLL: lower is better; "
        f"MMLU accuracy: higher is better). Speedup = lora-all's median step time / the arm's, {timing}; "
        f"predicted = the cost model's. `wall s` = probe + steps x that step time. Machine: "
        f"{hw.get('cpu', '?')}, {hw.get('device', '?')}, {hw.get('torch_threads', '?')} threads.",
        "",
        markdown_table(record),
    ]
    if record.get("answers"):
        lines += ["## Answers", "", *_answer_lines(record["answers"]), ""]
    if record.get("command"):
        lines += ["Command: `" + " ".join(record["command"]) + "`", ""]
    return "\n".join(lines)


def plot_study(record: dict[str, Any], path: str | Path) -> None:
    """Left: GSM8K test NLL against measured speedup, one point per arm. Right: forgetting deltas."""
    arms = [a for a in record["arms"] if "gsm8k_nll" in a["metrics"]]
    fig = new_figure((11, 4.5))
    left, right = fig.subplots(1, 2)
    for a in arms:
        x, y = a.get("measured_speedup", 1.0), a["metrics"]["gsm8k_nll"]
        color = "C3" if a["arm"] == DEFAULT_ARM else ("C0" if a["arm"].startswith("lora-all") else "C7")
        left.scatter([x], [y], color=color, zorder=3)
        left.annotate(a["arm"], (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    base = (record.get("base") or {}).get("gsm8k_nll")
    left.set_xlabel("measured step-time speedup over lora-all")
    left.set_ylabel("GSM8K test NLL (lower is better)" + (f"; base model {base:.3f}" if base else ""))
    left.grid(alpha=0.3)
    keys = [
        k for k, *_ in _FORGET if k.endswith("nll") and all(k in a.get("delta", {}) for a in record["arms"])
    ]
    names = [a["arm"] for a in record["arms"]]
    height = 0.8 / max(1, len(keys))
    for j, key in enumerate(keys):
        values = [a["delta"][key] for a in record["arms"]]
        right.barh([i + j * height for i in range(len(names))], values, height=height, label=key + " Δ")
    right.set_yticks([i + height * (len(keys) - 1) / 2 for i in range(len(names))], names, fontsize=7)
    right.invert_yaxis()
    right.axvline(0, color="k", lw=0.8)
    right.set_xlabel("forgetting: NLL change against the base model (lower is better)")
    if keys:
        right.legend(fontsize=7)
    fig.suptitle(f"Layer-selection study: {record['model']}", fontsize=10)
    save_png(fig, path)


__all__ = ["ARMS", "Arm", "StudyArguments", "batch_order", "markdown_table", "run_study", "train_arm"]
