"""Which layer selection actually works? Fine-tune one model several ways and compare, side by side.

``aletheia-lora study`` fine-tunes a model on a task once per *arm* with the same data
order, seed, steps and hyperparameters; the arms differ only in which layers get LoRA (and, for
one arm, the ranks). The task is GSM8K (``--gsm8k_dir``: answer NLL on its test split, optional
greedy exact match) or any dataset ``train`` reads (``--data``, e.g. plain text: the held-out NLL
of its test split, else of a seeded held-out share). Every arm is scored on the task and on
forgetting suites (general-text NLL, HumanEval-solution NLL, MMLU), as deltas against the base model.

**Signals.** The probe computes every signal (``run_probe(..., signals="all")``: the four gradient
signals in one pass and the ``contribution`` warm-up), recorded per seed in ``scores_by_seed``; the
probe-driven arms rank by ``--score`` (default ``grad-norm``). An arm is charged for its own signal
only: the warm-up's seconds for ``contribution`` (whose kept adapters then continue from the
warm-up), else the gradient pass's. ``answers["probe_stability"]`` gives each signal's Spearman
correlation between the probes of every two seeds. Writes ``study.json`` (after every arm, so a killed run keeps
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
``depth-aware@1.5x``     ``depth-aware`` at ``target_speedup=1.5`` (any target > 1), predicted by
                         the FLOP model *calibrated on this machine* at the study's batch shape
                         (``batch_size`` x ``max_length``, uniform r; once per study, kept in
                         ``study.json["machine_cost"]``): the cut that is really that much faster
                         here. A target no selection reaches is refused before any training.
``lora-all-equal-time``  every layer, for as many steps as fit in ``top``'s wall-clock
                         (probe included) at ``lora-all``'s measured step time; with it, every
                         other selection arm gets the same twin, ``lora-all-equal-time:NAME``
=======================  ==================================================================

Nothing here looks at the test split before the evaluation: the hyperparameters are fixed in
``StudyArguments`` and the probe reads training rows only.

**Seeds.** ``--seeds 0 1 2`` runs every arm once per seed; the seed sets the data order, the LoRA
initialisation and the probe's batch order (so a probe-driven arm may select other layers under another
seed). The evaluation items (and the general-text windows) come from ``--seed`` and are the same for
every seed, so seeds differ only in training. Without ``--seeds`` the study runs ``--seed`` alone, as
before. ``study.json`` keeps one entry per arm and seed (``"seed"``); ``study.md`` gives each arm's test
NLL as mean, sample standard deviation (n - 1) and n over seeds, and the per-seed values.

**Cost-matched random controls.** For every probe-driven arm (``top``, ``top-all-params``,
``depth-aware``, ``top-asym``, ``depth-aware-asym``) and seed, ``--controls K`` (default 3) random
selections of the arm's size that keep the arm's lowest layer and draw the rest from the layers above it
(:func:`stats.matched_random`, draw ``k`` of seed ``s`` seeded by ``(s, k)``), fine-tuned with the arm's
ranks, seed and steps, and no probe. Backward stops at the lowest adapted layer, so a control costs what
its arm costs per step: an arm that beats them does not do it by training deeper or for longer. When the
arm's selection is every layer from its lowest up, it is the only matched selection and no control is
drawn (reported). A control whose selection, ranks and seed equal an earlier run's reuses that run's
result (``"same_as"``; training is deterministic in them) instead of training it again.

**Arm against controls** (``answers["vs_matched_random"]``), at equal steps, blocked by seed (within a
seed the arm and its controls share data order and initialisation):

* ``difference`` = mean over seeds of (mean control NLL - arm NLL); positive: the arm is better.
* ``se``: its standard error from the within-seed spread of the control NLLs (pooled over seeds, seed
  effects removed; under the null hypothesis the arm varies as a control does); ``z = difference / se``
  ("the difference in standard errors"); None with a single control per seed.
* ``p_value``: one-sided permutation p-value, the share of within-seed relabellings of arm and control
  values whose difference is at least the observed one (:func:`stats.blocked_permutation_pvalue`): exact
  (every relabelling) when there are at most 10,000, else 10,000 drawn with ``--seed``. With one arm value
  and K controls per seed over S seeds there are ``(K + 1) ** S`` relabellings, so the smallest possible
  p is ``(K + 1) ** -S``: 1/4 for one seed and 3 controls, 1/64 for 3 seeds.

**Equal wall-clock.** Per seed, ``lora-all-equal-time`` gets as many all-layer steps as fit in that
seed's ``top`` wall-clock (its probe included, at the measured step times), and
``lora-all-equal-time:NAME`` as many as fit in arm NAME's; ``lora-all-equal-train-time:NAME`` as many
as fit in arm NAME's training time alone. The probe is a fixed cost, large against the few steps a
study trains and negligible against a real run's thousands: the two twins bracket it. A twin whose
step count equals an earlier all-layer run's of the same seed reuses that run (``"same_as"``).
``answers["vs_all"]`` gives every selection arm's NLL against ``lora-all`` at equal steps and against
its twins, per seed with mean and sd, beside its predicted and measured speedups;
``answers["top_vs_all"]`` is ``top``'s row, as before. The controls are compared at equal steps only:
they skip the probe, so at equal steps they take at most the arm's wall-clock.

**Resume.** ``study.json`` is rewritten after every run (arm, control, equal-time arm); ``--resume true``
with the same result-changing settings keeps every finished (arm, seed) and (arm, seed, draw) as
written and trains only what is missing. ``--seeds``, ``--controls`` and ``--arms`` may grow between
runs; the statistics use every run in the record.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .architecture import find_blocks
from .batches import collate
from .contribution import NAME as CONTRIBUTION
from .costmodel import CostModel
from .data import load_data, prepare_data, tokenize_dataset
from .evaluation import mean_loss
from .finetune import batch_order, load_base, train_arm
from .io import atomic_write_text
from .plan import machine_cost, run_probe, select, wrap_with_plan
from .report import layer_spans, new_figure, render_table, save_png
from .runs import check_output_dir, hardware, resumable_record, versions
from .scores import LayerScores
from .selection import budget
from .settings import (
    SCORES,
    AletheiaConfig,
    BudgetSettings,
    DataSettings,
    ModelSettings,
    OutputDirSettings,
    at_least,
)
from .stats import (
    blocked_difference,
    blocked_permutation_pvalue,
    matched_choices,
    matched_random,
    spearman,
    spread,
)
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
EQUAL_TRAIN_TIME = "lora-all-equal-train-time"
TWINS = (EQUAL_TIME, EQUAL_TRAIN_TIME)  # all-layer LoRA in an arm's time: probe included, or training only
PROBED = ("top", "depth-aware")  # the strategies that read the probe (and pay for it): they get controls


@dataclass(frozen=True)
class Arm:
    """One way to choose layers; ``strategy=None`` adapts every layer."""

    name: str
    strategy: str | None
    probe_params: str = "lora-targets"
    seed: int = 0
    attention_r: int | None = None
    mlp_r: int | None = None
    target: float | None = None  # depth-aware at this target speedup, predicted by the machine's cost model


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
        Arm(EQUAL_TRAIN_TIME, None),
    )
}
TARGET_ARM = "depth-aware@"  # + "1.5x": depth-aware at a target speedup measured on this machine


def target_arm(target: float) -> str:
    """The name of the arm that picks, by depth-aware, the layers predicted ``target`` times faster than
    all-layer LoRA on this machine: ``depth-aware@1.5x``."""
    return f"{TARGET_ARM}{target:g}x"


def equal_time_name(of: str, kind: str = EQUAL_TIME) -> str:
    """The all-layer run that gets arm ``of``'s time (``kind``: :data:`EQUAL_TIME`, its wall-clock with
    the probe; :data:`EQUAL_TRAIN_TIME`, its training time only): ``lora-all-equal-time`` for ``top`` (its
    name in every study so far), else ``KIND:NAME``, e.g. ``lora-all-equal-train-time:top``."""
    return EQUAL_TIME if (of, kind) == (DEFAULT_ARM, EQUAL_TIME) else f"{kind}:{of}"


def _twin_of(name: str) -> tuple[str, str] | None:
    """``(kind, arm)`` of an equal-time twin's name, else None."""
    kind, sep, of = name.partition(":")
    return (kind, of) if sep and kind in TWINS else None


def arm_named(name: str) -> Arm:
    """The arm called ``name``: one of :data:`ARMS`, a target arm (``depth-aware@1.5x``) or an equal-time
    twin (``lora-all-equal-time:NAME``, ``lora-all-equal-train-time:NAME``)."""
    if name in ARMS:
        return ARMS[name]
    if _twin_of(name):
        arm_named(_twin_of(name)[1])
        return Arm(name, None)
    match = re.fullmatch(re.escape(TARGET_ARM) + r"(\d+(?:\.\d+)?)x", name)
    if match and float(match[1]) > 1:
        return Arm(name, "depth-aware", target=float(match[1]))
    raise ValueError(
        f"unknown arm {name!r}; choose from {list(ARMS)}, or {TARGET_ARM}TARGETx for depth-aware at a target "
        f"speedup over all-layer LoRA on this machine (e.g. {target_arm(1.5)})."
    )


def is_equal_time(name: str) -> bool:
    """Whether ``name`` is an all-layer run timed to another arm's time."""
    return name in TWINS or _twin_of(name) is not None


def _strategy(name: str) -> str | None:
    """The strategy of arm ``name``; ``"unknown"`` for a name this version does not know (an old record)."""
    try:
        return arm_named(name).strategy
    except ValueError:
        return "unknown"


def arm_order(name: str) -> tuple:
    """Sort key of arm names: :data:`ARMS`' order, then target arms by target, then equal-time twins."""
    if name in ARMS:
        return (0, list(ARMS).index(name), 0.0, "")
    if _twin_of(name):
        kind, of = _twin_of(name)
        return (2 + TWINS.index(kind), *arm_order(of)[1:])
    try:
        return (1, 0, arm_named(name).target or 0.0, name)
    except ValueError:  # an arm this version does not know: last
        return (9, 0, 0.0, name)


@dataclass(kw_only=True)
class StudyArguments(ModelSettings, BudgetSettings, OutputDirSettings):
    """Settings of ``aletheia-lora study``: the shared model, budget and output groups, and its own.
    Every field is a flag of the same name."""

    gsm8k_dir: str | None = field(
        default=None,
        metadata={"help": "Folder with train.jsonl and test.jsonl of {question, answer} rows (GSM8K); or give "
                  "--data."},
    )  # fmt: skip
    data: str | None = field(
        default=None,
        metadata={"help": "Task data instead of --gsm8k_dir, any file or folder train reads (e.g. plain text): "
                  "its test split (else a seeded held-out share) is the test set, scored by held-out NLL."},
    )  # fmt: skip
    format: str | None = field(
        default=None,
        metadata={"help": "Row format of --data: text, prompt_completion, question_answer, messages, alpaca "
                  "(default: detect)."},
    )  # fmt: skip
    score: str = field(
        default="grad-norm",
        metadata={"help": "The probe signal the top and depth-aware arms rank layers by (every signal is "
                  "computed and recorded; see docs/method.md).", "choices": list(SCORES)},
    )  # fmt: skip
    mmlu_dir: str | None = field(
        default=None, metadata={"help": "Folder of MMLU CSVs for the forgetting suite (optional)."}
    )
    text: str | None = field(
        default=None,
        metadata={"help": "English text file for general-text NLL (default: pydoc_data.topics)."},
    )
    arms: list[str] = field(
        default_factory=lambda: list(ARMS),
        metadata={"help": f"Arms to run (lora-all always runs): {', '.join(ARMS)}, or {TARGET_ARM}TARGETx "
                  f"(e.g. {target_arm(1.5)}: depth-aware at that speedup, predicted by a cost model "
                  f"calibrated on this machine at the study's batch shape). {EQUAL_TIME} gives every "
                  f"selection arm an all-layer twin trained for the arm's wall-clock, probe included; "
                  f"{EQUAL_TRAIN_TIME} one for its training time alone (a long run's limit)."},
    )  # fmt: skip
    steps: int = field(default=48, metadata={"help": "Optimizer steps per arm."})
    batch_size: int = field(default=4, metadata={"help": "Examples per step."})
    max_length: int = field(default=256, metadata={"help": "Truncate training examples to this many tokens."})
    learning_rate: float = field(default=5e-4, metadata={"help": "AdamW learning rate (linear decay)."})
    warmup_steps: int = field(default=4, metadata={"help": "Linear warm-up steps."})
    r: int = field(default=16, metadata={"help": "LoRA rank (alpha = 2 r) of the uniform-rank arms."})
    probe_batches: int = field(default=5, metadata={"help": "Gradient-probe batches."})
    seed: int = field(
        default=0,
        metadata={"help": "Seed of the evaluation items, and of the data order, LoRA init and the probe when "
                  "--seeds is not given."},
    )  # fmt: skip
    seeds: list[int] | None = field(
        default=None,
        metadata={"help": "Run every arm once per seed (data order, LoRA init, probe order), e.g. --seeds "
                  "0 1 2; study.md gives mean, sd and n over seeds. Default: --seed alone."},
    )  # fmt: skip
    controls: int = field(
        default=3,
        metadata={"help": "Cost-matched random controls per probe-driven arm and seed: the arm's size, its "
                  "lowest layer kept, the rest drawn above it (0: none)."},
    )  # fmt: skip
    test_limit: int = field(default=100, metadata={"help": "Test rows (GSM8K questions) for the task NLL."})
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
        for name in self.arms:
            if _twin_of(name):
                raise ValueError(
                    f"arms has {name!r}; ask for {_twin_of(name)[0]} instead: it gives every selection arm "
                    f"its equal-time twin."
                )
            arm_named(name)
        wanted = {BASELINE, *self.arms} | ({DEFAULT_ARM} if set(TWINS) & set(self.arms) else set())
        self.arms = sorted(wanted, key=arm_order)  # fixed order: the baseline and default come first
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
            "controls",
        )
        if isinstance(self.seeds, int):
            self.seeds = [self.seeds]
        if self.seeds is not None:
            if not self.seeds:
                raise ValueError("seeds=[]; give at least one seed, or leave --seeds out for --seed alone.")
            self.seeds = list(dict.fromkeys(self.seeds))  # repeats would train the same runs twice
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate={self.learning_rate}; it must be > 0.")
        if (self.gsm8k_dir is None) == (self.data is None):
            raise ValueError(
                f"gsm8k_dir={self.gsm8k_dir!r}, data={self.data!r}: give exactly one task, --gsm8k_dir (GSM8K "
                f"answer NLL) or --data (held-out NLL of any dataset)."
            )
        if self.score not in SCORES:
            raise ValueError(f"score={self.score!r}; use one of {list(SCORES)}.")
        if self.score == "coherence" and self.probe_batches < 2:
            raise ValueError(
                f"score='coherence' with probe_batches={self.probe_batches}: coherence compares probe batches; "
                f"use --probe_batches 2 or more."
            )
        if self.data is not None:
            if self.exact_match:
                raise ValueError(
                    f"exact_match={self.exact_match} needs GSM8K answers; with --data leave --exact_match at 0."
                )
            return
        folder = Path(self.gsm8k_dir)
        missing = [f for f in ("train.jsonl", "test.jsonl") if not (folder / f).is_file()]
        if missing:
            raise FileNotFoundError(
                f"gsm8k_dir={self.gsm8k_dir!r} lacks {', '.join(missing)}; point it at a folder with "
                f"train.jsonl and test.jsonl of {{question, answer}} rows."
            )

    def fingerprint(self) -> dict[str, Any]:
        """The settings that change results (what ``--resume`` must match)."""
        # seeds and controls only add runs: a finished (arm, seed, draw) is the same whatever else is asked
        skip = {"arms", "output_dir", "resume", "overwrite_output_dir", "quiet", "time_rounds", "time_steps",
                "trust_remote_code", "seeds", "controls"}  # fmt: skip
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}

    @property
    def run_seeds(self) -> list[int]:
        """The training seeds: ``seeds``, or ``[seed]``."""
        return list(self.seeds) if self.seeds is not None else [self.seed]

    @classmethod
    def default_of(cls, name: str) -> Any:
        """A field's default (what a record written before the field existed ran with)."""
        f = cls.__dataclass_fields__[name]
        return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


# --------------------------------------------------------------------------- evaluation


TASK_METRICS = ("gsm8k_nll", "task_nll")  # the test metric: GSM8K's answer NLL, or --data's held-out NLL


def task_data(args: StudyArguments) -> DataSettings:
    """``--data`` as the data settings :func:`data.prepare_data` reads: its test split (or a seeded held-out
    share) capped at ``test_limit`` rows, both sides tokenized at ``max_length`` as in training."""
    return DataSettings(
        data=args.data, format=args.format, max_length=args.max_length, max_eval_samples=args.test_limit
    )


def load_task(args: StudyArguments, tokenizer) -> tuple[list[dict], dict[str, Any], list[dict]]:
    """The task: tokenized training rows, what the record says about them, and (``--data``) the tokenized
    test rows. Rows with nothing left to learn within ``max_length`` are dropped (with a warning)."""
    if args.data is not None:
        prepared = prepare_data(task_data(args), tokenizer, args.seed)
        rows, raw, test = prepared.train, prepared.train_rows, prepared.eval
        info = {"name": args.data, "format": prepared.format, "test_rows": len(test)}
    else:
        raw = load_data(str(Path(args.gsm8k_dir) / "train.jsonl"))
        rows = tokenize_dataset(raw, tokenizer, format="question_answer", max_length=args.max_length)
        test, info = [], {"name": "GSM8K", "format": "question_answer", "test_rows": args.test_limit}
    return (
        rows,
        info
        | {
            "train_rows": len(raw),
            "dropped_rows": len(raw) - len(rows),
            "truncated_rows": sum(len(r["input_ids"]) >= args.max_length for r in rows),
        },
        test,
    )


def load_eval_inputs(args: StudyArguments, task_rows: list[dict] | None = None) -> dict[str, Any]:
    """Each suite's items, drawn once (seeded) so every arm and the base see the same ones; ``task_rows``
    are ``--data``'s tokenized test rows."""
    test = load_data(str(Path(args.gsm8k_dir) / "test.jsonl")) if args.gsm8k_dir else []
    inputs: dict[str, Any] = {"gsm8k": sample(test, args.test_limit, args.seed) if test else []}
    inputs["gsm8k_generate"] = sample(test, args.exact_match, args.seed) if test and args.exact_match else []
    inputs["task"] = task_rows or []
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
    """Flat metrics: gsm8k_nll or task_nll, gsm8k_exact_match, text_nll, humaneval_nll, mmlu_accuracy,
    mmlu_loglik."""
    common = {"max_length": args.eval_max_length, "batch_size": args.eval_batch_size}
    out: dict[str, float] = {}
    if inputs.get("task"):
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        out["task_nll"] = mean_loss(model, inputs["task"], batch_size=args.eval_batch_size, pad_token_id=pad)
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


def _signature(entry: dict) -> list:
    """What a run's step time depends on: its layers and ranks (not its name, seed or steps)."""
    return [list(entry["selected_layers"]), entry.get("attention_r"), entry.get("mlp_r")]


def _label(entry: dict, seed: int) -> str:
    """A run's name in the timing: the arm's, with ``@seed`` for seeds other than ``--seed``."""
    return entry["arm"] if entry.get("seed", seed) == seed else f"{entry['arm']}@{entry['seed']}"


def time_arms(base, tokenizer, arms: list[dict], rows, order, args: StudyArguments, log) -> dict[str, Any]:
    """Step times of every trained arm, measured side by side: each distinct selection (layers and ranks;
    arms and seeds that share one share its time) wrapped once, one warm-up step, then ``time_rounds``
    interleaved rounds (``timing.interleaved``) of ``time_steps`` steps on the same batches."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(base.parameters()).device
    batches = [{k: v.to(device) for k, v in collate([rows[i] for i in step], pad).items()}
               for step in order[: args.time_steps]]  # fmt: skip
    models, configs = {}, {}
    for a in arms:
        if _signature(a) in configs.values():
            continue
        label = _label(a, args.seed)
        configs[label] = _signature(a)
        config = _config(arm_named(a["arm"]), args, args.seed)
        dummy = LayerScores({i: 1.0 for i in range(len(a["selected_layers"]))})
        model, _ = wrap_with_plan(copy.deepcopy(base), dummy, a["selected_layers"], config)
        params = [p for p in model.parameters() if p.requires_grad]
        models[label] = (model.train(), torch.optim.AdamW(params, lr=args.learning_rate))

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
        "configs": configs,
        "step_seconds": seconds,
        "median_seconds": {name: statistics.median(times) for name, times in seconds.items()},
    }


# --------------------------------------------------------------------------- the study


def _config(arm: Arm, args: StudyArguments, seed: int) -> AletheiaConfig:
    strategy = arm.strategy or "top"
    return AletheiaConfig(
        top_pct=args.top_pct,
        top_k=args.top_k,
        target_speedup=arm.target or (args.target_speedup if strategy == "depth-aware" else None),
        strategy=strategy,
        probe_params=arm.probe_params,
        probe_batches=args.probe_batches,
        score=args.score,
        r=args.r,
        lora_alpha=2 * args.r,
        attention_r=arm.attention_r,
        mlp_r=arm.mlp_r,
        mlp_rank_factor=1,  # the arms name their ranks: uniform r unless mlp_r is given
        seed=seed,  # probe order and LoRA init: the same for every arm of a seed
    )


def _train_and_evaluate(
    model, tokenizer, scores: LayerScores, selected: list[int], config: AletheiaConfig, rows, order, inputs,
    args: StudyArguments, probe_seconds: float,
) -> dict[str, Any]:  # fmt: skip
    """Wrap ``selected``, train ``order``'s steps, evaluate: the fields every run records."""
    peft_model, plan = wrap_with_plan(model, scores, selected, config, probe_seconds=probe_seconds)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    losses, seconds = train_arm(peft_model, rows, order, args, pad)
    peft_model.eval()
    metrics = evaluate(peft_model, tokenizer, inputs, args)
    steady = seconds[1:] or seconds  # the first step pays for warm-up
    return {
        "selected_layers": list(selected),
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


def run_arm(
    base,
    tokenizer,
    arm: Arm,
    rows,
    order,
    inputs,
    args: StudyArguments,
    probes: dict,
    seed: int | None = None,
    cost: CostModel | None = None,
) -> dict[str, Any]:
    """Select (one probe per seed and scoring, shared by the arms that use it), wrap, train, evaluate.
    ``cost``: the cost model a target arm's depth-aware weighs layers by (default: the model's FLOPs)."""
    seed = args.seed if seed is None else seed
    model = copy.deepcopy(base)
    config = _config(arm, args, seed)
    if (seed, arm.probe_params) not in probes:
        # every signal from the one pass, so that the record shows how each one ranks the layers per seed;
        # one probe per seed and scoring serves every arm (lora-energy at the first arm's ranks)
        scores, _ = run_probe(model, rows, config, tokenizer=tokenizer, signals="all")
        # what the arm pays is what its own signal costs: the warm-up for contribution, else the gradient
        # pass (which computed the four gradient signals, so an upper bound for any one of them)
        seconds = scores.meta["warmup_seconds"] if args.score == CONTRIBUTION else scores.meta["seconds"]
        probes[seed, arm.probe_params] = scores, seconds
    scores, probe_seconds = probes[seed, arm.probe_params]
    if arm.strategy is None:
        selected = list(range(find_blocks(model).num_layers))
    else:
        selected = select(scores, config, model=model, seed=arm.seed, cost=cost if arm.target else None)
    probed = arm.strategy in PROBED  # the arms that pay for the probe
    if not probed:  # nor do they continue a contribution warm-up: they start from LoRA's initialisation
        scores = LayerScores(scores, meta=scores.meta, signals=scores.signals)
    trained = _train_and_evaluate(
        model, tokenizer, scores, selected, config, rows, order, inputs, args,
        probe_seconds if probed else 0.0,
    )  # fmt: skip
    return {
        "arm": arm.name,
        "seed": seed,
        "strategy": arm.strategy or "all",
        "probe_params": arm.probe_params if probed else None,
        "selection_seed": arm.seed if arm.strategy == "random" else None,
        "attention_r": arm.attention_r,
        "mlp_r": arm.mlp_r,
    } | trained


_REUSED = ("trainable_params", "predicted_speedup", "steps", "step_seconds", "train_seconds", "first_loss",
           "final_loss", "losses", "metrics")  # fmt: skip


def run_control(
    base, tokenizer, parent: dict, draw: int, rows, order, inputs, args: StudyArguments, earlier: list[dict]
) -> dict[str, Any]:
    """Draw ``draw`` of ``parent``'s cost-matched random control (:func:`stats.matched_random`), trained
    like ``parent`` (its ranks, seed and steps) without a probe, and evaluated. An ``earlier`` run of the
    same seed, layers, ranks and steps is reused instead of trained again (``"same_as"``)."""
    arm, seed = arm_named(parent["arm"]), parent["seed"]
    selected = matched_random(parent["selected_layers"], find_blocks(base).num_layers, draw, seed)
    entry = {
        "arm": arm.name,
        "seed": seed,
        "draw": draw,
        "strategy": "matched-random",
        "draw_key": f"matched-random:{seed}:{draw}",
        "arm_layers": list(parent["selected_layers"]),
        "lowest_layer": min(selected),
        "attention_r": arm.attention_r,
        "mlp_r": arm.mlp_r,
    }
    signature = [selected, arm.attention_r, arm.mlp_r]
    same = next(
        (e for e in earlier if e["seed"] == seed and _signature(e) == signature and e["steps"] == len(order)
         and "same_as" not in e),
        None,
    )  # fmt: skip
    if same is not None:
        return entry | {"selected_layers": selected, "probe_seconds": 0.0} | {k: same[k] for k in _REUSED} | {
            "wall_seconds": same["train_seconds"],
            "same_as": {"arm": same["arm"], "draw": same.get("draw")},
        }  # fmt: skip
    config = _config(arm, args, seed)
    return entry | _train_and_evaluate(
        copy.deepcopy(base), tokenizer, LayerScores(), selected, config, rows, order, inputs, args, 0.0
    )


def _deltas(arm: dict, base: dict) -> dict[str, float]:
    return {k: v - base[k] for k, v in arm["metrics"].items() if k in base}


def summarize(record: dict[str, Any]) -> dict[str, Any]:
    """Derived comparisons: speedups against lora-all and deltas against the base (per run, against the
    same seed's lora-all), each arm over seeds (``record["across_seeds"]``), and the answers: the
    single-seed questions asked of each arm's mean over seeds, plus the seed statistics."""
    base = record["base"]
    refs = {a["seed"]: a for a in record["arms"] if a["arm"] == BASELINE}
    cost = CostModel(**record["machine_cost"]) if record.get("machine_cost") else None
    for a in record["arms"]:
        a["delta"] = _deltas(a, base)
        if cost is not None and a.get("attention_r") is None and a.get("mlp_r") is None:  # calibrated at r
            a["machine_predicted_speedup"] = cost.speedup(a["selected_layers"])
        ref = refs.get(a["seed"])
        if ref:
            a["measured_speedup"] = _step_seconds(record, ref) / _step_seconds(record, a)
            if _nll(a) is not None and _nll(ref):
                a["nll_vs_all"] = _nll(a) / _nll(ref) - 1
    record["across_seeds"] = across_seeds(record)
    means = {name: _mean_entry(runs) for name, runs in _by_arm(record["arms"]).items()}
    return answers(means) | seed_answers(record)


def _step_seconds(record: dict[str, Any], arm: dict) -> float:
    """A run's step time: from the side-by-side timing of its layers and ranks when there is one, else its
    training run's."""
    timing = record.get("timing") or {}
    timed = timing.get("median_seconds", {})
    if "configs" in timing:
        label = next((k for k, v in timing["configs"].items() if v == _signature(arm)), None)
        return timed[label] if label in timed else arm["step_seconds"]
    name = BASELINE if is_equal_time(arm["arm"]) else arm["arm"]  # a record from before the seeds
    return timed.get(name, arm["step_seconds"])


def _by_arm(runs: list[dict]) -> dict[str, list[dict]]:
    """Runs grouped by arm, in the study's arm order, each group in seed order of appearance."""
    out: dict[str, list[dict]] = {}
    for a in sorted(runs, key=lambda a: arm_order(a["arm"])):
        out.setdefault(a["arm"], []).append(a)
    return out


def _mean_entry(runs: list[dict]) -> dict[str, Any]:
    """One arm's runs as one: the run itself for one seed; else its metrics, deltas and speedup averaged
    over seeds (the first seed's layers; steps a list when they differ)."""
    if len(runs) == 1:
        return runs[0]

    def mean(key: str) -> dict[str, float]:
        keys = set.intersection(*(set(a.get(key) or {}) for a in runs))
        return {k: statistics.fmean(a[key][k] for a in runs) for k in sorted(keys)}

    steps = [a["steps"] for a in runs]
    out = {
        "arm": runs[0]["arm"],
        "seeds": [a["seed"] for a in runs],
        "metrics": mean("metrics"),
        "delta": mean("delta"),
        "selected_layers": runs[0]["selected_layers"],
        "steps": steps[0] if len(set(steps)) == 1 else steps,
        "attention_r": runs[0].get("attention_r"),
        "mlp_r": runs[0].get("mlp_r"),
    }
    if all("measured_speedup" in a for a in runs):
        out["measured_speedup"] = statistics.fmean(a["measured_speedup"] for a in runs)
    return out


def _seed_values(runs: list[dict], value) -> dict[str, Any]:
    """``stats.spread`` of ``value(run)`` over ``runs`` (None values left out), with the per-seed values."""
    values = {str(a["seed"]): value(a) for a in runs}
    values = {k: v for k, v in values.items() if v is not None}
    return spread(list(values.values())) | {"values": values}


def across_seeds(record: dict[str, Any]) -> dict[str, Any]:
    """Per arm: the seeds it ran, its layers per seed, and every metric's mean, sd and n over seeds with
    the per-seed values."""
    out = {}
    for name, runs in _by_arm(record["arms"]).items():
        metrics = sorted(set().union(*(a["metrics"] for a in runs)))
        out[name] = {
            "seeds": [a["seed"] for a in runs],
            "selected_layers": {str(a["seed"]): a["selected_layers"] for a in runs},
            "steps": {str(a["seed"]): a["steps"] for a in runs},
            **{m: _seed_values(runs, lambda a, m=m: a["metrics"].get(m)) for m in metrics},
        }
    return out


def matched_comparison(record: dict[str, Any], name: str) -> dict[str, Any] | None:
    """Arm ``name`` against its cost-matched random controls in test NLL, blocked by seed (module docs):
    mean and sd of each side, ``difference`` (controls - arm; positive: the arm is better), ``se``, ``z``,
    the one-sided permutation ``p_value``, and the per-seed values. None if the arm never ran."""
    runs = [a for a in record["arms"] if a["arm"] == name and _nll(a) is not None]
    if not runs:
        return None
    num_layers = record["num_layers"] or max(max(a["selected_layers"]) for a in record["arms"]) + 1
    groups, by_seed, no_alternative = [], {}, []
    for a in runs:
        controls = [c for c in record.get("controls", []) if c["arm"] == name and c["seed"] == a["seed"]]
        controls = sorted((c for c in controls if _nll(c) is not None), key=lambda c: c["draw"])
        choices = matched_choices(a["selected_layers"], num_layers)
        by_seed[str(a["seed"])] = {
            "arm_nll": _nll(a),
            "arm_layers": a["selected_layers"],
            "matched_selections": choices,
            "control_nll": [_nll(c) for c in controls],
            "control_layers": [c["selected_layers"] for c in controls],
        }
        if choices == 1:
            no_alternative.append(a["seed"])
        elif controls:
            groups.append(([_nll(a)], [_nll(c) for c in controls]))
    arm_values = [g[0][0] for g in groups]
    control_values = [v for g in groups for v in g[1]]
    compared = [a for a in runs if str(a["seed"]) in by_seed and by_seed[str(a["seed"])]["control_nll"]]
    controls = [c for c in record.get("controls", []) if c["arm"] == name and _nll(c) is not None]
    difference = blocked_difference(groups)
    test = blocked_permutation_pvalue(groups, seed=record["settings"].get("seed", 0))
    return {
        "seeds": len(groups),
        "no_alternative_seeds": no_alternative,  # the arm is every layer from its lowest up: nothing to draw
        "arm_nll": spread(arm_values),
        "control_nll": spread(control_values),
        "difference": difference["difference"],
        "se": difference["se"],
        "z": difference["z"],
        "df": difference["df"],
        "p_value": test["p_value"],
        "exact": test["exact"],
        "relabellings": test["relabellings"],
        # cost: the training runs' own median step times (controls keep the arm's backward depth)
        "arm_step_seconds": statistics.fmean(a["step_seconds"] for a in compared) if compared else None,
        "control_step_seconds": statistics.fmean(c["step_seconds"] for c in controls) if controls else None,
        "by_seed": by_seed,
    }


def probe_stability(record: dict[str, Any], params: str = "lora-targets") -> dict[str, Any]:
    """How much each probe signal's layer ranking depends on the probe's seed (its batches): the Spearman
    correlation of the signal between every pair of seeds, as mean, min and the pairs. Empty with fewer
    than two probed seeds."""
    by_seed = {
        s: probes[params]["signals"]
        for s, probes in (record.get("scores_by_seed") or {}).items()
        if params in probes and probes[params].get("signals")
    }
    seeds = sorted(by_seed, key=int)
    out: dict[str, Any] = {}
    for name in sorted(set.intersection(*(set(v) for v in by_seed.values()))) if len(seeds) > 1 else []:
        pairs = {}
        for i, a in enumerate(seeds):
            for b in seeds[i + 1 :]:
                layers = sorted(by_seed[a][name], key=int)
                pairs[f"{a}-{b}"] = spearman(
                    [by_seed[a][name][k] for k in layers], [by_seed[b][name][k] for k in layers]
                )
        values = [v for v in pairs.values() if not math.isnan(v)]
        out[name] = {
            "mean": statistics.fmean(values) if values else None,
            "min": min(values) if values else None,
            "pairs": pairs,
        }
    return out


def seed_answers(record: dict[str, Any]) -> dict[str, Any]:
    """The seed statistics: each probe-driven arm against its matched controls, and ``top`` against
    all-layer LoRA at equal steps and at equal wall-clock, per seed with mean and sd."""
    out: dict[str, Any] = {"vs_matched_random": {}, "probe_stability": probe_stability(record)}
    for name in _by_arm(record["arms"]):
        if _strategy(name) in PROBED:
            comparison = matched_comparison(record, name)
            if comparison is not None:
                out["vs_matched_random"][name] = comparison
    runs = {(a["arm"], a["seed"]): a for a in record["arms"]}
    tops = [a for a in record["arms"] if a["arm"] == DEFAULT_ARM and _nll(a) is not None]

    def versus(other: str):
        return lambda a: _nll(a) / _nll(runs[other, a["seed"]]) - 1 if (other, a["seed"]) in runs else None

    out["vs_all"] = {}
    for name, group in _by_arm(record["arms"]).items():
        if _strategy(name) in (None, "unknown"):
            continue
        twin, train_twin = equal_time_name(name), equal_time_name(name, EQUAL_TRAIN_TIME)
        out["vs_all"][name] = {
            "layers": {str(a["seed"]): a["selected_layers"] for a in group},
            "equal_steps": _seed_values(group, versus(BASELINE)),
            "equal_time": _seed_values(group, versus(twin)),
            "equal_time_steps": {str(s): a["steps"] for (n, s), a in runs.items() if n == twin},
            "equal_train_time": _seed_values(group, versus(train_twin)),
            "equal_train_time_steps": {str(s): a["steps"] for (n, s), a in runs.items() if n == train_twin},
            "measured_speedup": _seed_values(group, lambda a: a.get("measured_speedup")),
            "predicted_speedup": _seed_values(group, lambda a: a.get("predicted_speedup")),
            "machine_predicted_speedup": _seed_values(group, lambda a: a.get("machine_predicted_speedup")),
        }
    if tops and any((BASELINE, a["seed"]) in runs for a in tops):
        out["top_vs_all"] = {
            "equal_steps": _seed_values(tops, versus(BASELINE)),
            "equal_time": _seed_values(tops, versus(EQUAL_TIME)),
            "equal_time_steps": {str(s): a["steps"] for (n, s), a in runs.items() if n == EQUAL_TIME},
        }
    return out


def task_metric(metrics: dict[str, Any]) -> str | None:
    """The task's metric key in ``metrics`` (:data:`TASK_METRICS`), or None."""
    return next((k for k in TASK_METRICS if k in metrics), None)


def _nll(arm: dict | None) -> float | None:
    key = task_metric(arm["metrics"]) if arm else None
    return arm["metrics"][key] if key else None


def _task_name(record: dict[str, Any]) -> str:
    return (record.get("data") or {}).get("name", "GSM8K")


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


def target_cost(
    base: nn.Module, record: dict[str, Any], args: StudyArguments, say, write
) -> CostModel | None:
    """The cost model the target arms (``depth-aware@1.5x``) pick by: the model's FLOP model fitted to
    step times measured on this machine at the study's batch (``batch_size`` x ``max_length`` tokens,
    uniform r), once per study (kept in ``record["machine_cost"]`` for ``--resume``). None without target
    arms. A target no selection reaches is refused before any training."""
    targets = [arm_named(name).target for name in args.arms if arm_named(name).target]
    if not targets:
        return None
    if record.get("machine_cost") is None:
        say(f"calibrating the cost model on this machine ({args.batch_size} x {args.max_length} tokens) ...")
        config = dataclasses.replace(
            _config(ARMS[DEFAULT_ARM], args, args.seed),
            calibrate_batch_size=args.batch_size,
            calibrate_seq_len=args.max_length,
        )
        record["machine_cost"] = dataclasses.asdict(machine_cost(base, config))
        write()
    cost = CostModel(**record["machine_cost"])
    fastest = cost.speedup([cost.num_layers - 1])  # the last layer alone: the cheapest selection
    if max(targets) > fastest:
        raise ValueError(
            f"{target_arm(max(targets))} is out of reach: on this machine the fastest selection (the last layer "
            f"alone) is predicted {fastest:.2f}x faster than all-layer LoRA; ask for a lower target."
        )
    return cost


def run_study(args: StudyArguments, *, log=print, command: list[str] | None = None) -> dict[str, Any]:
    """Run every arm of ``args`` once per seed, with its matched controls, and write study.json /
    study.md / study.png to ``args.output_dir``."""
    out = Path(args.output_dir)
    previous = _previous(out / "study.json", args) if args.resume else None
    if previous is None:
        out = check_output_dir(args.output_dir, overwrite=args.overwrite_output_dir, create=False)
    say = (lambda *a: None) if args.quiet else log
    base, tokenizer, device = load_base(args)
    rows, data, task_rows = load_task(args, tokenizer)
    if not rows or (args.data is not None and not task_rows):
        raise ValueError(
            f"study needs training and test rows; after tokenizing, {len(rows)} training and {len(task_rows)} "
            f"test rows are left (raise --max_length or --test_limit)."
        )
    seeds = args.run_seeds
    # twice the steps: the equal-time arm may run longer than the others (the order is prefix-stable)
    orders = {seed: batch_order(len(rows), 2 * args.steps, args.batch_size, seed) for seed in seeds}
    inputs = load_eval_inputs(args, task_rows)
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
        "controls": [],
    }
    record["seeds"] = list(dict.fromkeys([*record.get("seeds", []), *seeds]))
    record["controls_per_seed"] = max(args.controls, record.get("controls_per_seed", 0))
    record["num_layers"] = find_blocks(base).num_layers

    def write() -> None:
        _write(out, record)

    if record["base"] is None:
        say("evaluating the base model ...")
        start = time.perf_counter()
        record["base"] = evaluate(base, tokenizer, inputs, args)
        record["base_eval_seconds"] = time.perf_counter() - start
        write()
    probes: dict = {}
    cost = target_cost(base, record, args, say, write)

    def run(name: str, seed: int) -> dict | None:
        return next((a for a in record["arms"] if a["arm"] == name and a["seed"] == seed), None)

    def train(name: str, seed: int, arm_order: list[list[int]], time_of: str | None = None) -> None:
        say(f"{name} (seed {seed}): training {len(arm_order)} steps ...")
        start = time.perf_counter()
        result = run_arm(base, tokenizer, arm_named(name), rows, arm_order, inputs, args, probes, seed, cost)
        result["seconds"] = time.perf_counter() - start
        if time_of is not None:
            result["time_of"] = time_of
        record["arms"].append(result)
        for (s, params), (scores, seconds) in probes.items():  # the probe(s) this run made
            signals = {n: {str(k): v for k, v in values.items()} for n, values in scores.signals.items()}
            probe = {"scores": dict(scores), "signals": signals, "probe_seconds": seconds}
            record.setdefault("scores_by_seed", {}).setdefault(str(s), {})[params] = probe
            if s == args.seed:
                record.setdefault("scores", {})[params] = probe
        say(f"{name} (seed {seed}): layers {result['selected_layers']}, step {result['step_seconds']:.2f} s, "
            f"test NLL {_nll(result) or float('nan'):.4f}")  # fmt: skip
        write()

    def control(parent: dict, draw: int, arm_order: list[list[int]]) -> None:
        start = time.perf_counter()
        earlier = [a for a in record["arms"] if not is_equal_time(a["arm"])] + record["controls"]
        result = run_control(base, tokenizer, parent, draw, rows, arm_order, inputs, args, earlier)
        result["seconds"] = time.perf_counter() - start
        record["controls"].append(result)
        reused = f" (the result of {result['same_as']['arm']})" if "same_as" in result else ""
        say(f"{parent['arm']} (seed {parent['seed']}) control {draw}: layers {result['selected_layers']}"
            f"{reused}, test NLL {_nll(result) or float('nan'):.4f}")  # fmt: skip
        write()

    for seed in seeds:
        for name in args.arms:
            if name not in TWINS and run(name, seed) is None:
                train(name, seed, orders[seed][: args.steps])
            elif name not in TWINS:
                say(f"{name} (seed {seed}): kept from the earlier run")
        for name in args.arms:
            parent = run(name, seed)
            if arm_named(name).strategy not in PROBED or not args.controls:
                continue
            if matched_choices(parent["selected_layers"], record["num_layers"]) == 1:
                say(f"{name} (seed {seed}): layers {parent['selected_layers']} are every layer from the "
                    f"lowest up; no matched random control differs from them")  # fmt: skip
                continue
            for draw in range(args.controls):
                if not any(
                    c["arm"] == name and c["seed"] == seed and c["draw"] == draw for c in record["controls"]
                ):
                    control(parent, draw, orders[seed][: args.steps])
    trained = [a for a in record["arms"] if not is_equal_time(a["arm"])]
    timing = record.get("timing") or {}
    timed = [list(v) for v in timing.get("configs", {}).values()]
    needed: list[list] = []
    for signature in map(_signature, trained):
        if signature not in needed:
            needed.append(signature)
    if args.time_rounds and sorted(map(repr, timed)) != sorted(map(repr, needed)):
        say(f"timing {len(needed)} selections side by side ...")
        record["timing"] = time_arms(base, tokenizer, trained, rows, orders[seeds[0]], args, say)
        write()
    for kind in (k for k in TWINS if k in args.arms):
        for seed in seeds:
            for name in args.arms:
                twin = equal_time_name(name, kind)
                if arm_named(name).strategy is None or run(twin, seed) is not None:
                    continue  # all-layer arms need no twin
                # as many all-layer steps as fit in the arm's wall-clock (probe included) or training time
                arm, all_layers = run(name, seed), run(BASELINE, seed)
                probe = arm["probe_seconds"] if kind == EQUAL_TIME else 0.0
                wall = probe + args.steps * _step_seconds(record, arm)
                steps = max(1, min(math.floor(wall / _step_seconds(record, all_layers)), len(orders[seed])))
                same = next((a for a in record["arms"] if a["seed"] == seed and a["steps"] == steps
                             and (a["arm"] == BASELINE or is_equal_time(a["arm"])) and "same_as" not in a),
                            None)  # fmt: skip
                if same is None:
                    train(twin, seed, orders[seed][:steps], time_of=name)
                    continue
                # all-layer training is deterministic in seed and steps: the same run, not trained again
                record["arms"].append(same | {"arm": twin, "time_of": name, "same_as": same["arm"]})
                say(f"{twin} (seed {seed}): {steps} steps, the result of {same['arm']}")
                write()
    record["budget_layers"] = budget(record["num_layers"], args.top_pct)
    record["answers"] = summarize(record)
    write()
    plot_study(record, out / "study.png")
    return record | {"table": markdown_table(record), "files": list(FILES), "output_dir": str(out)}


def _previous(path: Path, args: StudyArguments) -> dict[str, Any] | None:
    record = resumable_record(
        path, args.fingerprint(), StudyArguments.default_of, derived=("answers", "across_seeds")
    )
    if record is None:
        return None
    old = record.get("settings", {})
    # a record from before --seeds: its runs are --seed's, and it has no controls yet
    for a in record["arms"]:
        a.setdefault("seed", old.get("seed", StudyArguments.default_of("seed")))
    record.setdefault("controls", [])
    record.setdefault("seeds", sorted({a["seed"] for a in record["arms"]}))
    return record


def _write(out: Path, record: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "study.json", json.dumps(record, indent=1, default=str) + "\n")
    atomic_write_text(out / "study.md", markdown_report(record))


# --------------------------------------------------------------------------- report

_COLUMNS = (
    ("gsm8k_nll", "GSM8K test NLL", "{:.4f}"),
    ("task_nll", "test NLL", "{:.4f}"),
    ("gsm8k_exact_match", "GSM8K EM", "{:.3f}"),
)
_FORGET = (
    ("text_nll", "text NLL Δ", "{:+.4f}"),
    ("humaneval_nll", "HumanEval NLL Δ", "{:+.4f}"),
    ("mmlu_accuracy", "MMLU acc Δ", "{:+.3f}"),
    ("mmlu_loglik", "MMLU loglik Δ", "{:+.4f}"),
)


def _layers(layers: list[int]) -> str:
    return layer_spans(layers)


def _seeds(record: dict[str, Any]) -> list[int]:
    return list(dict.fromkeys(a.get("seed", 0) for a in record.get("arms", [])))


def markdown_table(record: dict[str, Any]) -> str:
    """One row per run (arm and seed; a ``seed`` column when there are several)."""
    base = record.get("base") or {}
    seeded = len(_seeds(record)) > 1
    metric_cols = [c for c in _COLUMNS if c[0] in base]
    forget_cols = [c for c in _FORGET if c[0] in base]
    head = ["arm", *(["seed"] if seeded else []), "layers", "trainable", *[c[1] for c in metric_cols],
            "vs all", *[c[1] for c in forget_cols], "speedup", "predicted", "steps", "probe s",
            "wall s"]  # fmt: skip
    base_cells = ["base model", *([""] if seeded else []), "-", "0",
                  *[c[2].format(base[c[0]]) for c in metric_cols], "", *["" for _ in forget_cols], "", "",
                  "0", "", ""]  # fmt: skip
    rows = [base_cells]
    for a in [a for runs in _by_arm(record.get("arms", [])).values() for a in runs]:
        m, d = a["metrics"], a.get("delta") or _deltas(a, base)
        vs = a.get("nll_vs_all", a.get("gsm8k_nll_vs_all"))  # the older name
        cells = [
            f"**{a['arm']}**" if a["arm"] == DEFAULT_ARM else a["arm"],
            *([str(a.get("seed", ""))] if seeded else []),
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


def _f(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _mean_sd(x: dict[str, Any], spec: str = ".4f") -> str:
    if not x.get("n"):
        return ""
    sd = f" ± {x['sd']:{spec.lstrip('+')}}" if x.get("sd") is not None else ""
    return f"{x['mean']:{spec}}{sd} (n={x['n']})"


def seeds_table(record: dict[str, Any]) -> str:
    """Per arm: test NLL mean, sd and n over seeds, and the per-seed values."""
    across = record.get("across_seeds") or across_seeds(record)
    head = ["arm", "n", "test NLL mean", "sd", "per seed", "layers per seed"]
    rows = []
    for name, arm in across.items():
        nll = arm.get(task_metric(arm) or "")
        if not nll:
            continue
        layers = {_layers(v) for v in arm["selected_layers"].values()}
        rows.append([
            f"**{name}**" if name == DEFAULT_ARM else name, nll["n"], _f(nll["mean"], ".4f"),
            _f(nll["sd"], ".4f"),
            ", ".join(f"{s}: {v:.4f}" for s, v in nll["values"].items()),
            next(iter(layers)) if len(layers) == 1
            else "; ".join(f"{s}: {_layers(v)}" for s, v in arm["selected_layers"].items()),
        ])  # fmt: skip
    return render_table(head, rows) + "\n"


def controls_table(record: dict[str, Any]) -> str:
    """Each probe-driven arm against its cost-matched random controls (``answers["vs_matched_random"]``)."""
    matched = (record.get("answers") or seed_answers(record)).get("vs_matched_random", {})
    head = ["arm", "seeds", "lowest layer", "size", "arm NLL", "controls NLL", "Δ (controls - arm)", "SE",
            "Δ / SE", "p (one-sided)", "relabellings", "step s arm / controls"]  # fmt: skip
    rows = []
    for name, m in matched.items():
        seeds = m["by_seed"].values()
        lowest = sorted({min(v["arm_layers"]) for v in seeds})
        sizes = sorted({len(v["arm_layers"]) for v in seeds})
        steps = (f"{m['arm_step_seconds']:.3f} / {m['control_step_seconds']:.3f}"
                 if m["arm_step_seconds"] and m["control_step_seconds"] else "")  # fmt: skip
        p = "" if m["p_value"] is None else f"{m['p_value']:.4f}" + ("" if m["exact"] else " (drawn)")
        rows.append([
            f"**{name}**" if name == DEFAULT_ARM else name,
            f"{m['seeds']}" + (f" (+{len(m['no_alternative_seeds'])} without)" if m["no_alternative_seeds"]
                               else ""),
            ",".join(map(str, lowest)), ",".join(map(str, sizes)), _mean_sd(m["arm_nll"]),
            _mean_sd(m["control_nll"]), _f(m["difference"], "+.4f"), _f(m["se"], ".4f"), _f(m["z"], "+.2f"),
            p,
            m["relabellings"] if m["p_value"] is not None else "", steps,
        ])  # fmt: skip
    return render_table(head, rows) + "\n"


def _step_range(steps: dict[str, int]) -> str:
    values = sorted(set(steps.values()))
    return "-".join(map(str, values[:: max(1, len(values) - 1)]))


def vs_all_table(record: dict[str, Any]) -> str:
    """Each selection arm against all-layer LoRA at equal steps, at equal wall-clock (probe included) and at
    equal training time (``answers["vs_all"]``), with its predicted and measured step speedups."""
    rows = []
    for name, v in ((record.get("answers") or seed_answers(record)).get("vs_all") or {}).items():
        layers = {_layers(x) for x in v["layers"].values()}
        rows.append([
            f"**{name}**" if name == DEFAULT_ARM else name,
            next(iter(layers)) if len(layers) == 1 else "; ".join(f"{s}: {_layers(x)}" for s, x in v["layers"].items()),
            _mean_sd(v["predicted_speedup"], ".2f"), _mean_sd(v["machine_predicted_speedup"], ".2f"),
            _mean_sd(v["measured_speedup"], ".2f"), _mean_sd(v["equal_steps"], "+.1%"),
            _mean_sd(v["equal_time"], "+.1%"), _step_range(v["equal_time_steps"]),
            _mean_sd(v.get("equal_train_time") or {}, "+.1%"), _step_range(v.get("equal_train_time_steps") or {}),
        ])  # fmt: skip
    head = ["arm", "layers", "predicted (FLOPs, H200)", "predicted (this machine)", "measured speedup",
            "vs all-layer, equal steps", "vs all-layer, equal wall-clock (probe included)", "all-layer steps",
            "vs all-layer, equal training time", "all-layer steps"]  # fmt: skip
    return render_table(head, rows) + "\n"


def stability_table(record: dict[str, Any]) -> str:
    """Each probe signal's rank stability across probe seeds (``answers["probe_stability"]``)."""
    stability = (record.get("answers") or seed_answers(record)).get("probe_stability") or {}
    head = ["signal", "mean Spearman between seeds", "min", "pairs"]
    rows = [
        [f"**{name}**" if name == record["settings"].get("score", "grad-norm") else name,
         _f(v["mean"], "+.3f"), _f(v["min"], "+.3f"),
         ", ".join(f"{k}: {x:+.3f}" for k, x in v["pairs"].items())]
        for name, v in stability.items()
    ]  # fmt: skip
    return render_table(head, rows) + "\n"


def _reused(control: dict) -> str:
    same = control.get("same_as")
    if same is None:
        return "yes"
    return f"result of {same['arm']}" + (f" draw {same['draw']}" if same["draw"] is not None else "")


def control_runs_table(record: dict[str, Any]) -> str:
    head = ["arm", "seed", "draw", "layers", "arm layers", "test NLL", "step s", "trained"]
    rows = [
        [c["arm"], c["seed"], c["draw"], _layers(c["selected_layers"]), _layers(c["arm_layers"]),
         _f(_nll(c), ".4f"), f"{c['step_seconds']:.3f}",
         _reused(c)]
        for c in record.get("controls", [])
    ]  # fmt: skip
    return render_table(head, rows) + "\n"


def _matched_line(name: str, m: dict[str, Any]) -> str:
    head = f"- **`{name}` vs cost-matched random (its size and lowest layer, equal steps):** "
    if not m["seeds"]:
        why = (
            "its selection is every layer from its lowest up in every seed, so no other selection matches it"
            if m["no_alternative_seeds"]
            else "no controls in the record (run with --controls K, and --resume true to add them)"
        )
        return head + why + "."
    line = head + f"test NLL {_mean_sd(m['arm_nll'])} against the controls' {_mean_sd(m['control_nll'])}"
    line += f"; Δ (controls - arm) {m['difference']:+.4f}"
    if m["z"] is not None:
        line += f" = {m['z']:+.2f} SE"
    if m["p_value"] is not None:
        how = f"exact over {m['relabellings']:,} relabellings" if m["exact"] else "10,000 drawn relabellings"
        verdict = "better than its controls" if m["p_value"] <= 0.05 else "not shown better than its controls"
        line += f"; one-sided permutation p = {m['p_value']:.4f} ({how}): {verdict} at the 5% level"
    if m["no_alternative_seeds"]:
        line += f" (seeds {m['no_alternative_seeds']} left out: no other matched selection)"
    return line + "."


def _answer_lines(ans: dict[str, Any]) -> list[str]:
    lines = [_matched_line(name, m) for name, m in (ans.get("vs_matched_random") or {}).items()]
    t = ans.get("top_vs_all")
    if t and t["equal_steps"]["n"] > 1:
        line = (
            f"- **`top` vs all-layer LoRA over seeds:** at equal steps {_mean_sd(t['equal_steps'], '+.1%')}"
        )
        if t["equal_time"]["n"]:
            line += f"; at equal wall-clock (probe included) {_mean_sd(t['equal_time'], '+.1%')}"
        lines.append(line + " in test NLL.")
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


def _seed_words(record: dict[str, Any]) -> str:
    seeds, eval_seed = _seeds(record), record["settings"].get("seed", 0)
    if seeds in ([], [eval_seed]):
        return f"seed {eval_seed}"
    return f"seeds {', '.join(map(str, seeds))} (evaluation items from seed {eval_seed})"


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
    task, data = _task_name(record), record.get("data") or {}
    tested = (
        f"{s['test_limit']} GSM8K test questions"
        if task == "GSM8K"
        else f"{data.get('test_rows', '?')} held-out rows of {task} ({data.get('format', '?')})"
    )
    lines = [
        f"# Layer-selection study: {record['model']}, {task}",
        "",
        f"{task} train, {s['steps']} steps x batch {s['batch_size']} (max {s['max_length']} tokens), lr "
        f"{s['learning_rate']}, r={s['r']}, budget {s['top_pct']}% of layers, probe signal "
        f"`{s.get('score', 'grad-norm')}`, {_seed_words(record)}; test NLL on {tested}. Forgetting Δ = arm - base model (NLL: lower is "
        f"better; MMLU accuracy: higher is better). Speedup = lora-all's median step time / the arm's, "
        f"{timing}; predicted = the cost model's. `wall s` = probe + steps x that step time. Machine: "
        f"{hw.get('cpu', '?')}, {hw.get('device', '?')}, {hw.get('torch_threads', '?')} threads.",
        "",
        markdown_table(record),
    ]
    if any(_nll(a) is not None for a in record.get("arms", [])):
        lines += [
            "## Across seeds",
            "",
            "Each arm's test NLL over the seeds it ran: mean, sample standard deviation (n - 1), n, "
            "and the value of every seed. A seed sets the data order, the LoRA initialisation and the "
            "probe's batches; the test questions are the same for every seed.",
            "",
            seeds_table(record),
        ]
    matched = (record.get("answers") or seed_answers(record)).get("vs_matched_random")
    if matched:
        lines += [
            "## Against cost-matched random controls",
            "",
            "Controls: random selections of the arm's size that keep its lowest layer and draw the rest "
            "above it (so the same backward depth and step cost), with the arm's ranks, seed and steps and "
            "no probe. Δ = mean over seeds of (controls' mean NLL - the arm's): positive, the arm is better. "
            "SE from the within-seed spread, pooled over seeds. p: one-sided permutation p-value of the "
            "arm's NLLs against the controls', relabelled within each seed; exact up to 10,000 "
            "relabellings, else 10,000 drawn. The smallest p possible is 1 / relabellings. Step s: the "
            "training runs' own medians.",
            "",
            controls_table(record),
        ]
        if record.get("controls"):
            lines += ["### Control runs", "", control_runs_table(record)]
    if (record.get("answers") or {}).get("vs_all"):
        lines += [
            "## Against all-layer LoRA: equal steps and equal wall-clock",
            "",
            "Test NLL of each selection arm relative to all-layer LoRA of the same seed (negative: the arm is "
            "better), mean ± sd over seeds: at the same number of steps; against all-layer LoRA trained for "
            "as many steps as fit in the arm's wall-clock, its probe included (`lora-all-equal-time*` runs); "
            "and in the arm's training time alone (`lora-all-equal-train-time:*`: what a long run, where the "
            "probe's seconds vanish, would see). "
            "Speedups: predicted by the FLOP model with H200 factors, by the cost model calibrated on this "
            "machine (when a target arm ran), and measured side by side.",
            "",
            vs_all_table(record),
        ]
    if (record.get("answers") or {}).get("probe_stability"):
        lines += [
            "## Probe signals across seeds",
            "",
            "How much each signal's layer ranking depends on the probe's batches: Spearman correlation of "
            "the signal's per-layer values between the probes of two seeds (1: the same ranking). Bold: the "
            "signal the arms ranked by.",
            "",
            stability_table(record),
        ]
    if record.get("answers"):
        lines += ["## Answers", "", *_answer_lines(record["answers"]), ""]
    if record.get("command"):
        lines += ["Command: `" + " ".join(record["command"]) + "`", ""]
    return "\n".join(lines)


def _plot_vs_all(ax, vs_all: dict[str, dict]) -> None:
    """Grouped bars: each selection arm's test NLL relative to all-layer LoRA (mean ± sd over seeds) at
    equal steps, equal wall-clock (probe included) and equal training time."""
    kinds = (("equal_steps", "equal steps"), ("equal_time", "equal wall-clock (probe incl.)"),
             ("equal_train_time", "equal training time"))  # fmt: skip
    names = list(vs_all)
    height = 0.8 / len(kinds)
    for j, (key, label) in enumerate(kinds):
        stats = [vs_all[n].get(key) or {} for n in names]
        values = [100 * x["mean"] if x.get("n") else 0.0 for x in stats]
        errors = [100 * x["sd"] if x.get("sd") is not None else 0.0 for x in stats]
        ax.barh([i + j * height for i in range(len(names))], values, height=height, xerr=errors, capsize=2,
                label=label, color=f"C{j}")  # fmt: skip
    ax.set_yticks([i + height for i in range(len(names))], names, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel("test NLL vs all-layer LoRA, %\n(negative: the selection is better)")
    ax.legend(fontsize=7, loc="best", title="mean ± sd over seeds", title_fontsize=7)
    ax.grid(alpha=0.3, axis="x")


def study_figure(record: dict[str, Any]):
    """Left: the task's test NLL against measured speedup, one point per arm (the mean over seeds, with the sd
    as an error bar), and each arm's controls in grey at the arm's speedup. Middle, when equal-time twins
    ran: each selection arm against all-layer LoRA at equal steps, wall-clock and training time. Right, when
    a forgetting suite ran: forgetting deltas (mean over seeds); else the title says none ran. Equal-time
    twins appear only in the middle panel."""
    means = [_mean_entry(runs) for name, runs in _by_arm(record["arms"]).items() if not is_equal_time(name)]
    across = record.get("across_seeds") or across_seeds(record)
    vs_all = (record.get("answers") or {}).get("vs_all") or {}
    timed = any(v.get(k, {}).get("n") for v in vs_all.values() for k in ("equal_time", "equal_train_time"))
    keys = [k for k, *_ in _FORGET if k.endswith("nll") and all(k in a.get("delta", {}) for a in means)]
    panels = 1 + timed + bool(keys)
    fig = new_figure({1: (6, 4.5), 2: (11, 4.5), 3: (16, 4.8)}[panels])
    axes = list(fig.subplots(1, panels, squeeze=False)[0])
    left = axes.pop(0)
    for a in means:
        key = task_metric(a["metrics"])
        if key is None:
            continue
        x, y = a.get("measured_speedup", 1.0), a["metrics"][key]
        sd = (across.get(a["arm"], {}).get(key) or {}).get("sd")
        color = "C3" if a["arm"] == DEFAULT_ARM else ("C0" if a["arm"].startswith("lora-all") else "C7")
        controls = [
            _nll(c) for c in record.get("controls", []) if c["arm"] == a["arm"] and _nll(c) is not None
        ]
        if controls:
            left.scatter([x] * len(controls), controls, color="0.75", marker="x", s=14, zorder=2)
        left.errorbar([x], [y], yerr=[sd] if sd else None, color=color, fmt="o", capsize=3, zorder=3)
        left.annotate(a["arm"], (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    base = _nll({"metrics": record.get("base") or {}})
    left.set_xlabel("measured step-time speedup over lora-all" + ("; x: matched random controls" if
                    record.get("controls") else ""))  # fmt: skip
    left.set_ylabel(
        f"{Path(_task_name(record)).name} test NLL (lower is better)" + (f"; base {base:.3f}" if base else "")
    )
    left.grid(alpha=0.3)
    if timed:
        _plot_vs_all(axes.pop(0), vs_all)
    if keys:
        right, names = axes.pop(0), [a["arm"] for a in means]
        height = 0.8 / len(keys)
        for j, key in enumerate(keys):
            values = [a["delta"][key] for a in means]
            right.barh([i + j * height for i in range(len(names))], values, height=height, label=key + " Δ")
        right.set_yticks([i + height * (len(keys) - 1) / 2 for i in range(len(names))], names, fontsize=7)
        right.invert_yaxis()
        right.axvline(0, color="k", lw=0.8)
        right.set_xlabel("forgetting: NLL Δ against the base model\n(lower is better)")
        right.legend(fontsize=7)
    title = f"Layer-selection study: {Path(str(record['model'])).name}, {_task_name(record)}"
    fig.suptitle(title + ("" if keys else " (no forgetting suite was run)"), fontsize=10)
    return fig


def plot_study(record: dict[str, Any], path: str | Path) -> None:
    """:func:`study_figure`, written to ``path`` as PNG."""
    save_png(study_figure(record), path)


__all__ = [
    "ARMS",
    "Arm",
    "StudyArguments",
    "across_seeds",
    "batch_order",
    "controls_table",
    "markdown_table",
    "matched_comparison",
    "run_control",
    "run_study",
    "seed_answers",
    "seeds_table",
    "train_arm",
]
