"""Does the policy spend test-time compute well? In-context (sequential) against parallel.

Two measurements of the same held-out problems, both at the training budget's tokens per episode
(``max_total_tokens / max_episodes``, the budget scaled by :func:`episode_budget`):

- **The in-context gain curve**: the success of one trial allowed m episodes, for m in
  ``eval.adaptation_episodes`` (default 1, 2, 4, 8). An RL^2 policy that uses its earlier
  episodes (and, with ``env.feedback``, the environment's replies to them) rises with m.
- **Sequential against parallel at equal tokens**: for k in the same list, the pass@k and maj@k
  of k independent one-episode trials, each with ``max_total_tokens / max_episodes`` tokens, so
  k of them hold the token budget of one k-episode trial. (Each one-episode trial also writes
  its own answer, so the parallel side spends up to (k - 1) x ``answer_max_tokens`` more.)
  pass@k is the chance that at least one of k trials succeeds, maj@k that the majority answer of
  k trials is right (ties: the first given): both are estimated without bias from n =
  max(k) one-episode trials per problem, pass@k in closed form (Chen et al. 2021:
  1 - C(n - c, k) / C(n, k), c of n correct), maj@k as the mean over every k-subset of the n
  trials (or :data:`MAX_SUBSETS` of them drawn at random, seeded, when there are more).

Sequential success at m = 1 is the success of those one-episode trials, so it equals pass@1.
Every figure comes with a 95% interval over problems (1.96 standard errors of the per-problem
means). Trials sample at the evaluation's temperature from a fresh generator per budget (common
random numbers, as :func:`metarl_llm.evaluation.heldout.evaluate_at_budgets`); no meta-prover
runs. Per-problem adaptation (``adapt=ttt``) is not measured here.
"""

from __future__ import annotations

import itertools
import logging
import math
from typing import Callable

import numpy as np
import torch

from metarl_llm.config import BudgetConfig, EvalConfig
from metarl_llm.core.trial import StreamCodec, Trial
from metarl_llm.core.voting import majority_index
from metarl_llm.evaluation.curves import scale_budget
from metarl_llm.models import temperature_of, tempered
from metarl_llm.rollout.engine import get_engine, heldout_resets, run_trials
from metarl_llm.runtime.progress import Progress

log = logging.getLogger(__name__)

MAX_SUBSETS = 256  # maj@k: every k-subset of the n trials up to this many, else this many drawn at random
Z95 = 1.96  # normal quantile of a two-sided 95% interval


def episode_budget(budget: BudgetConfig, m: int) -> BudgetConfig:
    """``budget`` with ``m`` episodes and ``m`` x its tokens per episode (max_total_tokens /
    max_episodes, rounded half up): :func:`metarl_llm.evaluation.curves.scale_budget` by m / max_episodes."""
    if m < 1:
        raise ValueError(f"eval.adaptation_episodes: every episode budget must be >= 1, got {m}")
    return scale_budget(budget, m / budget.max_episodes)


def pass_at_k(correct: int, n: int, k: int) -> float:
    """Unbiased pass@k of one problem from ``correct`` successes among ``n`` >= k samples:
    1 - C(n - c, k) / C(n, k) (Chen et al. 2021)."""
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got k={k}, n={n}")
    return 1.0 - math.comb(n - correct, k) / math.comb(n, k)


def maj_at_k(answers: list[str | None], scores: list[float], k: int, rng: np.random.Generator) -> float:
    """maj@k of one problem from its n >= k trials' answers and the score of each answer: the
    mean over k-subsets (all of them, or :data:`MAX_SUBSETS` random ones) of the score of the
    subset's majority answer (:func:`metarl_llm.core.voting.majority_index`; 0 with no vote)."""
    n = len(answers)
    if not 1 <= k <= n:
        raise ValueError(f"maj_at_k: need 1 <= k <= n, got k={k}, n={n}")
    if math.comb(n, k) <= MAX_SUBSETS:
        subsets = list(itertools.combinations(range(n), k))
    else:
        subsets = [tuple(sorted(rng.choice(n, size=k, replace=False))) for _ in range(MAX_SUBSETS)]
    total = 0.0
    for sub in subsets:
        i = majority_index([answers[j] for j in sub])
        total += 0.0 if i is None else scores[sub[i]]
    return total / len(subsets)


def mean_ci(values: np.ndarray) -> tuple[float, float]:
    """Mean of per-problem values [P] and the half-width of its 95% interval (0 for one problem)."""
    v = np.asarray(values, dtype=np.float64)
    half = Z95 * v.std(ddof=1) / math.sqrt(len(v)) if len(v) > 1 else 0.0
    return float(v.mean()), float(half)


def _answer_score(t: Trial) -> float:
    return 0.0 if not (t.answer or "").strip() else float(t.grader.score(t.answer.strip()))


@torch.no_grad()
def evaluate_adaptation(
    model: torch.nn.Module,
    codec: StreamCodec,
    budget: BudgetConfig,
    cfg: EvalConfig,
    make_env: Callable[[BudgetConfig], object],
    new_generator: Callable[[], torch.Generator],
    engine=None,
) -> dict:
    """The in-context gain curve and sequential-against-parallel figures (module docstring) on
    ``cfg.num_problems`` held-out problems. Returns a JSON-ready dict keyed by m (as strings):
    ``episodes`` [m ...]; ``sequential_success``, ``sequential_ci95``, ``sequential_tokens``
    (policy tokens per trial), ``sequential_episodes`` (episodes per trial, a forced answer counted); ``parallel_pass``,
    ``parallel_pass_ci95``, ``parallel_maj``, ``parallel_maj_ci95``, ``parallel_tokens`` (k x the
    one-episode trials' policy tokens); ``samples`` (trials per problem: sequential, one-episode).
    ``new_generator()``: a fresh sampling generator, called once per budget (the same draws at each);
    the maj@k subsets are drawn from a NumPy generator seeded from it."""
    ms = sorted({int(m) for m in cfg.adaptation_episodes})
    n_par = max(ms)
    p, k_seq = cfg.num_problems, cfg.samples_per_problem
    engine = engine if engine is not None else get_engine("cached")
    temperature = cfg.temperature if cfg.temperature is not None else temperature_of(model)
    was_training = model.training
    model.eval()
    rng = np.random.default_rng(int(new_generator().initial_seed()))

    def play(b: BudgetConfig, samples: int) -> list[Trial]:
        resets, groups = heldout_resets(p, samples)
        envs = [make_env(b) for _ in range(p * samples)]
        with tempered(model, temperature):
            return run_trials(model, codec, envs, resets, groups, b, new_generator(), engine=engine, greedy=cfg.greedy)

    progress = Progress(len(ms), "held-out in-context gain (episode budgets)", unit="budget", every_s=0)
    one = play(episode_budget(budget, 1), n_par)  # [P x n_par], problem-major
    progress.update(1)
    out: dict = {"episodes": ms, "samples": {"sequential": k_seq, "one_episode": n_par}}
    for key in ("sequential_success", "sequential_ci95", "sequential_tokens", "sequential_episodes"):
        out[key] = {}
    for key in ("parallel_pass", "parallel_pass_ci95", "parallel_maj", "parallel_maj_ci95", "parallel_tokens"):
        out[key] = {}
    outcome = np.array([t.outcome for t in one]).reshape(p, n_par)
    correct = (outcome >= 1.0).sum(1)
    answers = [[t.answer for t in one[i * n_par : (i + 1) * n_par]] for i in range(p)]
    scores = [[_answer_score(t) for t in one[i * n_par : (i + 1) * n_par]] for i in range(p)]
    one_tokens = float(np.mean([t.policy_tokens for t in one]))
    for k in ms:
        label = str(k)
        out["parallel_pass"][label], out["parallel_pass_ci95"][label] = mean_ci([pass_at_k(int(c), n_par, k) for c in correct])
        out["parallel_maj"][label], out["parallel_maj_ci95"][label] = mean_ci(
            [maj_at_k(answers[i], scores[i], k, rng) for i in range(p)]
        )
        out["parallel_tokens"][label] = k * one_tokens
        if k == 1:
            trials, per_problem = one, outcome.mean(1)
        else:
            trials = play(episode_budget(budget, k), k_seq)
            per_problem = np.array([t.outcome for t in trials]).reshape(p, k_seq).mean(1)
            progress.update(1)
        out["sequential_success"][label], out["sequential_ci95"][label] = mean_ci(per_problem)
        out["sequential_tokens"][label] = float(np.mean([t.policy_tokens for t in trials]))
        out["sequential_episodes"][label] = float(np.mean([len(t.episode_texts) for t in trials]))
        log.info(
            "held-out with %d episode(s): sequential success %.3f +- %.3f (%.0f tokens); %d one-episode trials: "
            "pass@%d %.3f, maj@%d %.3f (%.0f tokens)",
            k,
            out["sequential_success"][label],
            out["sequential_ci95"][label],
            out["sequential_tokens"][label],
            k,
            k,
            out["parallel_pass"][label],
            k,
            out["parallel_maj"][label],
            out["parallel_tokens"][label],
        )
    progress.close()
    model.train(was_training)
    return out


def adaptation_scalars(fig: dict) -> dict[str, float]:
    """Flat W&B/metrics.jsonl keys of :func:`evaluate_adaptation`'s figures (``heldout_adapt/...``)."""
    out = {}
    for label in fig["sequential_success"]:
        out[f"heldout_adapt/sequential_success_{label}ep"] = fig["sequential_success"][label]
        out[f"heldout_adapt/sequential_tokens_{label}ep"] = fig["sequential_tokens"][label]
        out[f"heldout_adapt/parallel_pass@{label}"] = fig["parallel_pass"][label]
        out[f"heldout_adapt/parallel_maj@{label}"] = fig["parallel_maj"][label]
    return out
