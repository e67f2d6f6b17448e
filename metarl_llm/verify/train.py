"""Trained verifiers (issue 4, "Verification"): data, training, scoring, best-of-N.

A :class:`Verifier` is a causal-LM trunk with a linear scalar head; it reads the
hidden state at a chosen stream position and returns the logit of P(success). It is
trained on trials sampled from a base policy, each labelled by its environment, and
then serves two uses:

- **VB at test time**: best-of-N, the trial with the highest verifier score among N
  sampled trials, beside maj@N and pass@N (:func:`best_of_n`);
- **the ``verifier`` estimator of J** (docs/design.md section 6): its score at every episode
  boundary of a trial (:func:`score_prefixes`, :func:`trained_verifier_estimator`).

Token in, token out: a verifier reads the policy's own token ids (never decoded and
re-tokenised), so it must share the policy's vocabulary (:func:`check_same_vocabulary`).

Examples and labels (:func:`verifier_examples`)
-----------------------------------------------
Each trial gives one *end* example, read at the trial's last token, and (with
``prefixes=True``) one *prefix* example per boundary of ``bonus.boundary_prefixes``
(after the prompt, after each episode before the final-answer one), read at the
prefix's last token. Every example of a trial carries the trial's label:

    label = 1.0 if outcome >= 1.0 else 0.0

A graded outcome below 1 (partial credit) is a failure: the verifier estimates
P(outcome >= 1), the success that pass@k and best-of-N count.

What the scores estimate. Binary cross-entropy is minimised by the conditional mean
of the label given what the verifier reads, so:

- at the trial's end, the outcome is a function of the stream: the verifier is an
  outcome reward model, P(success | whole trial);
- at a prefix, the label is **one Monte-Carlo sample** of the sampling policy's success
  from that prefix: the policy went on writing episodes (with the rest of its budget)
  and the trial's outcome was observed once. The verifier estimates
  V^pi(prefix) = P(the *sampling* policy eventually succeeds | prefix). This is a J-like
  value but **not the meta-prover's J**, which is P(success | the policy is forced to
  answer right after the prefix): V^pi counts the episodes still to come, so it is
  usually above J, and it refers to the policy that sampled the data, not to a policy
  trained afterwards. Its progress differences are advantages of the sampling policy
  (a "process advantage verifier", Setlur et al. 2024) rather than MRT's information gain.
  Prefix examples of one trial share one label, so they are correlated; the held-out
  metrics are given for all examples and for end and prefix examples apart.

Held-out metrics (:func:`verifier_metrics`)
-------------------------------------------
With p = sigmoid(logit) and 0/1 labels y over n examples:

- ``accuracy``: share of examples with (p >= 0.5) == y;
- ``bce``: mean of -[y log p + (1-y) log(1-p)] (nats, from the logits);
- ``brier``: mean of (p - y)^2;
- ``ece``: expected calibration error over 10 equal-width bins of p: bin b holds the
  examples with min(floor(10 p), 9) == b (so [b/10, (b+1)/10), the last bin [0.9, 1]),
  and ECE = sum_b (n_b / n) |mean(y in b) - mean(p in b)|; empty bins count 0;
- ``auroc``: P(p+ > p-) + 1/2 P(p+ = p-) for a random positive and negative example,
  computed from midranks (tied scores share the mean of their ranks); nan when one
  class is absent;
- ``positive_rate``: mean label (the base rate), ``predicted_positive_rate``: share with
  p >= 0.5, ``mean_prob``: mean p, ``count``: n.

These pool the examples of all problems. Best-of-N ranks the trials *of one problem*
against each other, so the job also reports ``heldout/end/within_problem_auroc``
(:func:`within_problem_auroc`): the mean over held-out problems with a success and a failure
of the AUROC among that problem's whole trials. A verifier that only tells easy problems
from hard ones scores above 0.5 pooled and 0.5 within problems. With a within-problem
AUROC near 0.5, best-of-N can fall *below* a random pick: the highest of N noisy scores
goes to an atypical trial, and where the policy's correct answer is its most frequent
one, atypical trials are mostly wrong (``best_of_n/pick_answer_share@<n>`` against
``best_of_n/answer_share@<n>`` shows it).

Integration
-----------
- The ``verifier`` estimator of J: :func:`trained_verifier_estimator` has the
  ``Estimator`` signature of :mod:`metarl_llm.rl.bonus` and reads ``opts.verifier`` as the
  directory of a saved verifier (``bonus.verifier=/path/to/verifier``).
- ``job=train_verifier``: :func:`run_verifier_training` takes already-built objects (policy,
  codec, environment factory, verifier, budget, :class:`VerifierConfig`) and does it all:
  sample, label, train, save, best-of-N.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from metarl_llm.config import BudgetConfig, VerifierConfig
from metarl_llm.core.trial import StreamCodec
from metarl_llm.rollout.engine import heldout_resets
from metarl_llm.runtime.progress import Progress
from metarl_llm.verify.best_of_n import best_of_n_trials, play_trials, plot_best_of_n
from metarl_llm.verify.calibration import evaluate_verifier, within_problem_auroc
from metarl_llm.verify.data import VerifierExamples, _batch, ranking_pairs, trial_label, verifier_examples
from metarl_llm.verify.model import Verifier, check_same_vocabulary
from metarl_llm.verify.scoring import score_trials

LogFn = Callable[[dict, int], None]  # (metrics, step), as metarl_llm.runtime.tracking.Tracker.log


# ---------------------------------------------------------------------- training


def train_verifier(
    verifier: Verifier,
    train_examples: VerifierExamples,
    heldout_examples: VerifierExamples | None,
    steps: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
    log: LogFn | None = None,
    *,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    eval_every: int = 0,
    log_every: int = 10,
    rows: int = 32,
    progress_bar: bool = False,
    pair_weight: float = 0.0,
) -> dict[str, float]:
    """Train ``verifier`` in place with binary cross-entropy on the logits (and, with
    ``pair_weight`` > 0, a within-problem ranking loss).

    1. Each step draws ``batch_size`` examples without replacement from a permutation of
       the training examples (a new permutation, from ``generator``, at each pass).
    2. The examples' streams form a right-padded batch, one row per distinct stream
       (several prefixes of one trial are read from one row: the trunk is causal).
    3. BCE-with-logits, AdamW (``lr``, ``weight_decay``), gradients clipped to norm
       ``max_grad_norm``.
    4. With ``pair_weight`` > 0, the same forward pass also reads batch_size // 4 (at least
       1) pairs: a problem drawn uniformly from those with a success and a failure
       (:func:`ranking_pairs`), one of its successful and one of its failed whole trials drawn
       uniformly; the loss adds ``pair_weight`` * mean softplus(z_failed - z_success)
       (logged as ``train/pair_loss``).

    ``log(metrics, step)`` receives ``train/loss`` (mean over the last ``log_every``
    steps), ``train/grad_norm`` (before clipping) and, every ``eval_every`` steps
    (0: never) and after the last, ``heldout/...`` (:func:`evaluate_verifier`).
    Returns the last metrics: ``train/loss``, ``train/steps``, ``train/examples``,
    ``train/time_s`` and the ``heldout/...`` figures (when ``heldout_examples`` is given).
    """
    if len(train_examples) == 0:
        raise ValueError("train_verifier: no training examples")
    for name, v in (("steps", steps), ("batch_size", batch_size), ("log_every", log_every), ("rows", rows)):
        if v < (0 if name == "steps" else 1):
            raise ValueError(f"train_verifier: {name} must be >= {0 if name == 'steps' else 1}, got {v}")
    if eval_every < 0 or not lr > 0:
        raise ValueError(f"train_verifier: need eval_every >= 0 and lr > 0, got {eval_every} and {lr}")
    if not pair_weight >= 0:
        raise ValueError(f"train_verifier: pair_weight must be >= 0, got {pair_weight}")
    pairs = ranking_pairs(train_examples) if pair_weight > 0 else None
    n_pairs = max(1, batch_size // 4)
    pair_losses: list[float] = []
    t0 = time.perf_counter()
    optimizer = torch.optim.AdamW(verifier.parameters(), lr=lr, weight_decay=weight_decay)
    device = verifier.device
    labels = torch.as_tensor(train_examples.label)
    m = len(train_examples)
    perm, cursor = torch.randperm(m, generator=generator), 0
    losses: list[float] = []
    metrics: dict[str, float] = {}

    def heldout(step: int) -> None:
        if heldout_examples is not None and len(heldout_examples):
            metrics.update({f"heldout/{k}": v for k, v in evaluate_verifier(verifier, heldout_examples, rows).items()})
            if log is not None:
                log({k: v for k, v in metrics.items() if k.startswith("heldout/")}, step)

    verifier.train()
    progress = Progress(steps, "verifier training", bar=progress_bar)
    for step in range(1, steps + 1):
        take, got = [], 0
        while got < min(batch_size, m):
            if cursor == m:
                perm, cursor = torch.randperm(m, generator=generator), 0
            n = min(batch_size, m) - got
            n = min(n, m - cursor)
            take.append(perm[cursor : cursor + n])
            cursor, got = cursor + n, got + n
        idx = torch.cat(take).numpy()
        n_bce = len(idx)  # the BCE's examples; the pairs' reads follow them
        if pairs is not None:
            idx = np.concatenate([idx, draw_pairs(pairs, n_pairs, generator)])
        ids, mask, r, c = _batch(
            train_examples.streams, train_examples.pad_id, train_examples.stream[idx], train_examples.position[idx], device
        )
        z = verifier.logits_at(ids, mask, r, c)
        loss = F.binary_cross_entropy_with_logits(z[:n_bce], labels[idx[:n_bce]].to(device))
        if pairs is not None:
            z_pos, z_neg = z[n_bce:].view(2, n_pairs)
            pair_loss = F.softplus(z_neg - z_pos).mean()
            pair_losses.append(pair_loss.detach().item())
            loss = loss + pair_weight * pair_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(verifier.parameters(), max_grad_norm))
        optimizer.step()
        losses.append(loss.detach().item())
        progress.update(1, loss=losses[-1])
        if step % log_every == 0 or step == steps:
            metrics["train/loss"] = float(np.mean(losses[-log_every:]))
            if pair_losses:
                metrics["train/pair_loss"] = float(np.mean(pair_losses[-log_every:]))
            if log is not None:
                log({k: v for k, v in metrics.items() if k.startswith("train/")} | {"train/grad_norm": grad_norm}, step)
        if eval_every and step % eval_every == 0 and step != steps:
            heldout(step)
            verifier.train()
    progress.close()
    verifier.eval()
    heldout(steps)
    metrics.update({"train/steps": float(steps), "train/examples": float(m), "train/time_s": time.perf_counter() - t0})
    return metrics


def draw_pairs(pairs: tuple[list[np.ndarray], list[np.ndarray]], n: int, generator: torch.Generator) -> np.ndarray:
    """[2n] example indices: n successes, then the n failures they are ranked against, each
    pair from one problem drawn uniformly from :func:`ranking_pairs` (with replacement)."""
    pos, neg = pairs
    problems = torch.randint(len(pos), (n,), generator=generator).tolist()
    u = torch.rand(2, n, generator=generator).numpy()
    win = [pos[p][int(u[0, i] * len(pos[p]))] for i, p in enumerate(problems)]
    lose = [neg[p][int(u[1, i] * len(neg[p]))] for i, p in enumerate(problems)]
    return np.array(win + lose, dtype=np.int64)


def write_heldout_scores(path: Path, trials, scores) -> Path:
    """One JSON line per held-out trial, in best-of-N's order: its problem (``group``), the
    verifier's score of the whole trial, outcome, answer, policy tokens, episodes, whether
    the answer was forced, and the episodes' text (what best-of-N chose among)."""
    with open(path, "w") as f:
        for t, score in zip(trials, scores):
            row = {
                "group": int(t.group),
                "problem_id": t.problem_id,
                "score": float(score),
                "outcome": float(t.outcome),
                "answer": t.answer,
                "policy_tokens": int(t.policy_tokens),
                "episodes": len(t.episode_ends),
                "forced": bool(t.forced),
                "episode_texts": list(t.episode_texts),
            }
            f.write(json.dumps(row) + "\n")
    return path


def run_verifier_training(
    policy: nn.Module,
    codec: StreamCodec,
    make_env: Callable[[str], object],
    verifier: Verifier,
    budget: BudgetConfig,
    cfg: VerifierConfig,
    generator: torch.Generator,
    run_dir: str | Path,
    log: LogFn | None = None,
    progress_bar: bool = False,
) -> dict:
    """``job=train_verifier``: train a verifier on a base policy's trials and measure best-of-N.

    1. Sample ``cfg.samples_per_problem`` trials on each of ``cfg.num_train_problems``
       training-split problems (problem seeds drawn from ``generator``), and max(n_values)
       trials on each of ``cfg.num_heldout_problems`` held-out problems
       (``evaluate.heldout_resets``), from ``policy`` under ``budget``.
    2. Label them (:func:`verifier_examples`, prefixes per ``cfg.prefixes``).
    3. :func:`train_verifier`; held-out metrics on the held-out trials' examples.
    4. Save the verifier to ``run_dir/verifier`` (usable as ``bonus.verifier``).
    5. Best-of-N against maj@N and pass@N on the held-out trials; ``run_dir/best_of_n.png``;
       the within-problem AUROC; every held-out trial's score in ``run_dir/heldout_scores.jsonl``.

    ``make_env(split)`` makes one environment (as ``trainer.env_factory``). ``log`` gets
    the training metrics (steps 1..steps) and then the base policy's success and the
    best-of-N figures (``best_of_n/...``, at step ``cfg.steps``). Returns a summary dict
    (JSON-ready): every last metric, the best-of-N table and the paths written.
    """
    cfg.validate()
    check_same_vocabulary(verifier.tokenizer, codec.tokenizer)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    was_training = policy.training
    policy.eval()

    # 1. sample
    seeds = torch.randint(0, 2**31 - 1, (cfg.num_train_problems,), generator=generator).tolist()
    resets = [{"seed": int(sd)} for sd in seeds for _ in range(cfg.samples_per_problem)]
    groups = [p for p in range(cfg.num_train_problems) for _ in range(cfg.samples_per_problem)]
    train_trials, _ = play_trials(policy, codec, make_env, "train", resets, groups, budget, generator, cfg.rollout_rows)
    n_max = max(cfg.n_values)
    split_size = make_env("test").unwrapped.num_problems
    num_heldout = min(cfg.num_heldout_problems, split_size) if split_size is not None else cfg.num_heldout_problems
    resets, groups = heldout_resets(num_heldout, n_max)
    heldout_trials, answer_scores = play_trials(
        policy, codec, make_env, "test", resets, groups, budget, generator, cfg.rollout_rows
    )
    policy.train(was_training)
    t_sample = time.perf_counter() - t0

    # 2-3. label and train
    train_ex = verifier_examples(train_trials, codec, cfg.prefixes)
    heldout_ex = verifier_examples(heldout_trials, codec, cfg.prefixes)
    metrics = train_verifier(
        verifier,
        train_ex,
        heldout_ex,
        cfg.steps,
        cfg.batch_size,
        cfg.lr,
        generator,
        log,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        eval_every=cfg.eval_every,
        log_every=cfg.log_every,
        rows=cfg.rows,
        progress_bar=progress_bar,
        pair_weight=cfg.pair_weight,
    )

    # 4. save
    verifier_dir = verifier.save(run_dir / "verifier")

    # 5. best-of-N on the held-out trials
    end_scores = score_trials(verifier, heldout_trials, cfg.rows)
    bon = best_of_n_trials(end_scores, heldout_trials, cfg.n_values, answer_scores)
    within, mixed = within_problem_auroc(end_scores, [trial_label(t) for t in heldout_trials], [t.group for t in heldout_trials])
    scores_path = write_heldout_scores(run_dir / "heldout_scores.jsonl", heldout_trials, end_scores)
    plot_path = run_dir / "best_of_n.png"
    plot_best_of_n(bon, plot_path, title=f"best-of-N on {num_heldout} held-out problems")
    base = {
        "base/train_success": float(np.mean([t.outcome for t in train_trials])),
        "base/heldout_success": float(np.mean([t.outcome for t in heldout_trials])),
        "base/tokens_per_trial": float(np.mean([t.policy_tokens for t in heldout_trials])),
    }
    scalars = dict(base)
    scalars["heldout/end/within_problem_auroc"] = within
    scalars["heldout/end/mixed_problems"] = float(mixed)
    for i, n in enumerate(bon["n"]):
        for key in ("best_of_n", "maj_at_n", "pass_at_n", "mean_outcome", "tokens", "pick_answer_share", "answer_share"):
            scalars[f"best_of_n/{key}@{n}"] = bon[key][i]
    if log is not None:
        log(scalars, cfg.steps)
    summary = {
        **{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in {**metrics, **scalars}.items()},
        "best_of_n": bon,
        "train_trials": len(train_trials),
        "heldout_trials": len(heldout_trials),
        "heldout_problems": num_heldout,
        "train_examples": len(train_ex),
        "heldout_examples": len(heldout_ex),
        "sample_time_s": t_sample,
        "wall_time_s": time.perf_counter() - t0,
        "verifier_dir": str(verifier_dir),
        "best_of_n_plot": str(plot_path),
        "heldout_scores": str(scores_path),
    }
    (run_dir / "verifier_summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    return summary
