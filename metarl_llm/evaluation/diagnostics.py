"""Base-policy diagnostics: heterogeneity and anti-concentration (docs/design.md section 1.2).

Setlur et al. 2025 ("Scaling test-time compute without verification or RL is
suboptimal", arXiv 2502.12118) show that verifier-based training beats verifier-free
training by a gap growing like sqrt(H) in the compute budget H when the base policy is

- **heterogeneous**: the value of different continuations of one prefix varies a lot
  (the policy solves a problem in many different ways), and
- **anti-concentrated**: on a problem, it has a non-trivial chance to do better than
  its own mean by a margin tied to its spread.

:func:`heterogeneity` and :func:`anti_concentration` are the estimators, pure
functions of sample arrays (their docstrings define the quantities).
:func:`policy_diagnostics` samples a policy on held-out problems and computes both.

What the driver measures for heterogeneity
------------------------------------------
The rollout API plays trials from ``reset`` only; it cannot resume a trial from a given
prefix. So the value of a continuation is the **meta-prover's** value: for each of N
first episodes z_0 sampled from the policy after the prompt x (the first episodes of N
ordinary trials), V(x, z_0) = J(x + z_0), the success rate of the policy forced to
answer right after that first episode (forced-answer text appended, as in the
``sample`` J estimator of ``metarl_llm.rl.bonus``), estimated from m sampled forced
answers, each scored with ``env.score``. This is J after the first episode, also when
that episode already committed an answer (the meta-prover is then asked again); it is
*not* the success rate of playing the rest of the trial.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from metarl_llm.config import BudgetConfig
from metarl_llm.core.trial import StreamCodec, Trial
from metarl_llm.rollout.base import Engine
from metarl_llm.rollout.engine import heldout_resets, run_trials
from metarl_llm.rollout.meta_prover import meta_prover_success

TIE_TOLERANCE = 1e-9  # anti_concentration: comparisons with mu and mu + margin*sigma absorb float rounding of that size


class Heterogeneity(NamedTuple):
    """Output of :func:`heterogeneity`.

    value       the MC-noise-corrected estimate of sigma^2_het (mean over prefixes).
    uncorrected the mean over prefixes of the plain sample variance (biased upward).
    per_prefix  [P] the corrected estimate of each prefix (may be negative).
    """

    value: float
    uncorrected: float
    per_prefix: np.ndarray


class AntiConcentration(NamedTuple):
    """Output of :func:`anti_concentration`.

    value       the mean over problems.
    per_problem [P] each problem's share of trials that beat its mean by the margin.
    """

    value: float
    per_problem: np.ndarray


def _unit_matrix(x, name: str, fn: str) -> np.ndarray:
    """``x`` as a float64 [P, N] array with P >= 1, N >= 2 and every entry in [0, 1]."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 2:
        raise ValueError(f"{fn}: {name} must be a 2-D array [P, N] with P >= 1 and N >= 2, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{fn}: {name} holds non-finite entries")
    if a.min() < 0.0 or a.max() > 1.0:
        raise ValueError(f"{fn}: {name} must lie in [0, 1], got entries in [{a.min()}, {a.max()}]")
    return a


def _check_num_rollouts(num_rollouts, fn: str) -> None:
    if isinstance(num_rollouts, bool) or not isinstance(num_rollouts, (int, np.integer)) or num_rollouts < 2:
        raise ValueError(
            f"{fn}: num_rollouts must be an integer >= 2, got {num_rollouts!r} (with one outcome per continuation "
            "the between-continuation variance cannot be told apart from Monte-Carlo noise)"
        )


def _check_margin(margin, fn: str) -> None:
    if (
        isinstance(margin, bool)
        or not isinstance(margin, (int, float, np.integer, np.floating))
        or not (math.isfinite(margin) and margin >= 0)
    ):
        raise ValueError(f"{fn}: margin must be a finite number >= 0, got {margin!r}")


def heterogeneity(values, num_rollouts: int) -> Heterogeneity:
    """sigma^2_het: the mean over prefixes of the variance of the true values of the
    policy's continuations, estimated from Monte-Carlo values and corrected for their noise.

    ``values`` [P, N], entries in [0, 1]: for each of P prefixes s_p, N continuations
    c_p1..c_pN sampled independently from the policy, and for each continuation
    v_pi = the mean outcome of ``num_rollouts`` (m >= 2) completions of (s_p, c_pi)
    sampled independently. The true value is V_pi = E[v_pi | c_pi]. The quantity is

        sigma^2_het = (1/P) sum_p Var_{c ~ pi(.|s_p)}[V(s_p, c)].

    Estimator, per prefix p (N >= 2):

        S2_p    = 1/(N-1) sum_i (v_pi - vbar_p)^2                 (sample variance, ddof=1)
        noise_p = 1/N     sum_i v_pi (1 - v_pi) / (m - 1)
        het_p   = S2_p - noise_p

    With 0/1 outcomes, E[S2_p] = Var[V] + E[V(1-V)]/m (the MC noise of an m-sample mean
    is V(1-V)/m) and E[v(1-v)/(m-1)] = V(1-V)/m, so E[het_p] = Var[V] exactly: the
    estimator is unbiased. With graded outcomes in [0, 1] the noise V(1-V)/m is an upper
    bound, so het_p is biased low (conservative). het_p is not clipped at 0 (clipping
    would bias it upward); a single prefix's estimate can be negative.

    m == 1 is a ValueError: with one 0/1 outcome per continuation the v_pi are i.i.d.
    Bernoulli(E[V]) whatever Var[V] is, so the quantity cannot be estimated at all.

    Returns ``Heterogeneity(value = mean_p het_p, uncorrected = mean_p S2_p,
    per_prefix = het [P])``.
    """
    v = _unit_matrix(values, "values", "heterogeneity")
    _check_num_rollouts(num_rollouts, "heterogeneity")
    sample_var = v.var(axis=1, ddof=1)  # [P]
    noise = (v * (1.0 - v)).mean(axis=1) / (int(num_rollouts) - 1)  # [P]
    per_prefix = sample_var - noise
    return Heterogeneity(float(per_prefix.mean()), float(sample_var.mean()), per_prefix)


def anti_concentration(rewards, margin: float) -> AntiConcentration:
    """The mean over problems of the share of trials that beat the problem's mean by
    ``margin`` standard deviations.

    ``rewards`` [P, N], entries in [0, 1] (0/1 or graded): N trial rewards on each of P
    problems (N >= 2). Per problem p, mu_p = the mean of its N rewards and sigma_p their
    *population* standard deviation (ddof=0). Trial i of problem p counts iff

        r_pi >= mu_p + margin * sigma_p   and   r_pi > mu_p

    (the second condition: strictly better than the mean, which matters at margin 0).
    A problem with sigma_p = 0 (all rewards equal) contributes 0: nobody beats a
    deterministic policy. Both comparisons allow :data:`TIE_TOLERANCE` of float rounding.

        AC = (1/P) sum_p (1/N) #{i counted}

    For 0/1 rewards with success share p (0 < p < 1), sigma = sqrt(p(1-p)) and only the
    successes can count, so a problem's share is p * 1[1 >= p + margin*sqrt(p(1-p))]:
    the successes count iff p <= 1/(1 + margin^2). No unbiasedness correction: this is
    the plug-in value of the empirical reward distribution.

    ``margin`` >= 0. Returns ``AntiConcentration(value = AC, per_problem [P])``.
    """
    r = _unit_matrix(rewards, "rewards", "anti_concentration")
    _check_margin(margin, "anti_concentration")
    mu = r.mean(axis=1, keepdims=True)  # [P, 1]
    sigma = r.std(axis=1, keepdims=True)  # [P, 1], ddof=0
    counted = (r >= mu + margin * sigma - TIE_TOLERANCE) & (r > mu + TIE_TOLERANCE)  # [P, N]
    per_problem = np.where(np.ptp(r, axis=1) > 0, counted.mean(axis=1), 0.0)
    return AntiConcentration(float(per_problem.mean()), per_problem)


def first_episode_commits(trials: list[Trial]) -> float:
    """Share of ``trials`` whose first episode committed the answer (``answer_episode == 0``,
    not forced; a forced answer after one episode is the environment's, not the policy's)."""
    if not trials:
        raise ValueError("first_episode_commits: no trials")
    return float(np.mean([t.answer_episode == 0 and not t.forced for t in trials]))


def first_episode_values(
    model: torch.nn.Module,
    codec: StreamCodec,
    trials: list[Trial],
    num_rollouts: int,
    answer_max_tokens: int,
    generator: torch.Generator | None = None,
    engine: Engine | None = None,
) -> np.ndarray:
    """J after each trial's first episode: the mean ``env.score`` of ``num_rollouts``
    meta-prover answers (at most ``answer_max_tokens`` tokens each) sampled after the
    prompt + episode 0 + forced-answer tokens. All trials' answers come from one batched
    ``sample`` call; the contexts are the trials' own token ids. Returns [len(trials)]."""
    ends = [[t.episode_ends[0] + 1] for t in trials]
    values = meta_prover_success(model, codec, trials, ends, num_rollouts, answer_max_tokens, generator, engine)
    return np.concatenate(values) if values else np.zeros(0)


@dataclass
class PolicyDiagnostics:
    """Output of :func:`policy_diagnostics` (P problems, N trials each).

    metrics:            scalars to log: ``heterogeneity`` (corrected), ``heterogeneity_uncorrected``,
                        ``anti_concentration``, ``success`` (mean outcome), ``first_episode_J``
                        (mean of ``values``) and ``first_episode_commits`` (share of the trials whose
                        first episode committed the answer, not forced).
    rewards:            [P, N] trial outcomes, the input of anti-concentration.
    values:             [P, N] J after each trial's first episode (m meta-prover answers),
                        the input of heterogeneity.
    heterogeneity:      :func:`heterogeneity` of ``values``.
    anti_concentration: :func:`anti_concentration` of ``rewards``.
    trials:             the P x N trials, problem-major (trial p*N + i is row p, column i).
    """

    metrics: dict[str, float]
    rewards: np.ndarray
    values: np.ndarray
    heterogeneity: Heterogeneity
    anti_concentration: AntiConcentration
    trials: list[Trial]


def policy_diagnostics(
    model: torch.nn.Module,
    codec: StreamCodec,
    envs: list,
    budget: BudgetConfig,
    num_problems: int,
    num_continuations: int,
    num_rollouts: int,
    margin: float,
    generator: torch.Generator | None = None,
    engine: Engine | None = None,
) -> PolicyDiagnostics:
    """Heterogeneity and anti-concentration of ``model`` on held-out problems 0..P-1.

    1. Play N = ``num_continuations`` trials on each of P = ``num_problems`` problems
       under ``budget`` (``envs``: at least P x N held-out environments made with
       ``max_episodes=budget.max_episodes``).
    2. Anti-concentration of their outcomes [P, N] at ``margin``.
    3. Heterogeneity of the meta-prover after the first episode (module docstring): the
       N first episodes of a problem are N continuations of its prompt; each is valued
       by m = ``num_rollouts`` meta-prover answers (one batched ``sample`` call).

    ``engine``: the rollout engine of the trials and of the meta-prover's answers (None: a
    default cached one). The model is put in eval mode for the sampling and restored after.
    """
    fn = "policy_diagnostics"
    for name, value, least in (("num_problems", num_problems, 1), ("num_continuations", num_continuations, 2)):
        if value < least:
            raise ValueError(f"{fn}: {name} must be >= {least}, got {value}")
    _check_num_rollouts(num_rollouts, fn)
    _check_margin(margin, fn)
    n = num_problems * num_continuations
    if len(envs) < n:
        raise ValueError(f"{fn}: {len(envs)} environments for {num_problems} x {num_continuations} = {n} trials")
    was_training = model.training
    model.eval()
    try:
        resets, groups = heldout_resets(num_problems, num_continuations)
        trials = run_trials(model, codec, envs[:n], resets, groups, budget, generator, engine=engine or "cached")
        values = first_episode_values(model, codec, trials, num_rollouts, budget.answer_max_tokens, generator, engine)
    finally:
        model.train(was_training)
    shape = (num_problems, num_continuations)
    rewards = np.array([t.outcome for t in trials], dtype=np.float64).reshape(shape)
    values = values.reshape(shape)
    het = heterogeneity(values, num_rollouts)
    ac = anti_concentration(rewards, margin)
    metrics = {
        "heterogeneity": het.value,
        "heterogeneity_uncorrected": het.uncorrected,
        "anti_concentration": ac.value,
        "success": float(rewards.mean()),
        "first_episode_J": float(values.mean()),
        # trials whose first episode committed the answer: J after it is then that trial's 0/1 outcome
        # (the share that set the progress dial's heterogeneity to p(1 - p); bench/results/README.md)
        "first_episode_commits": first_episode_commits(trials),
    }
    return PolicyDiagnostics(metrics, rewards, values, het, ac, trials)
