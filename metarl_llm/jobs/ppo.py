"""The training loop: warm start, then PPO over multi-episode trials.

One iteration:
  1. rollout   - ``problems_per_iter`` training problems x ``group_size`` trials, played
                 episode by episode against Gymnasium environments (metarl_llm.rollout.engine);
  2. score     - one forward pass for the sampling policy's log-probs and values, one
                 for the frozen reference's log-probs (with algo.old_logprobs=sampled the
                 policy's is skipped: the rollout engine's sampling log-probs, and with a
                 shared critic the values it computed while sampling, are used instead);
  3. bonus     - per-episode progress bonuses (metarl_llm.rl.bonus);
  4. rewards   - outcome and KL (and, with bonus.credit=return, the bonuses) placed on
                 action tokens (metarl_llm.core.batch);
  5. advantages- the registered estimator (metarl_llm.rl.advantages); the outcome
                 advantages are whitened and, with the default bonus.credit=episode,
                 each episode's bonus is then added to the advantages of that episode's
                 own tokens (MRT's dense credit), in reward units, so that alpha keeps
                 its meaning (metarl_llm.rl.advantages.combine_advantages);
  6. update    - PPO epochs over minibatches (metarl_llm.rl.update);
  7. log       - scalars to metrics.jsonl and W&B; held-out evaluation and checkpoints
                 at intervals.

Each stage is a method of :class:`PPOJob` (``iteration()`` calls them in this order); the
per-iteration scalars are the pure function :func:`iteration_metrics`. Set-up (models,
optimiser, resume, tracker, environments) is :meth:`PPOJob.__init__`, apart from the loop.

After the last iteration the final checkpoint is saved and evaluated with
``metarl_llm.evaluation.heldout.evaluate_and_report`` (held-out success-vs-tokens curves, regret,
token efficiency, maj@k at 0.5x..4x the training budget), the function the command
``python -m metarl_llm.evaluate`` runs, so re-evaluating that checkpoint reproduces
summary.json's figures.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import psutil
import torch
from tqdm.auto import tqdm

import envs  # noqa: F401  (registers the environments)
from envs.base import FailureGuard
from metarl_llm.config import TrainConfig
from metarl_llm.core.batch import RolloutBatch, collate, place_rewards, sampled_logprobs, sampled_values
from metarl_llm.evaluation.adaptation import adaptation_scalars
from metarl_llm.evaluation.curves import episode_figures, finite_or_none, token_efficiency_ratio
from metarl_llm.evaluation.heldout import (
    TRANSCRIPT_COLUMNS,
    EvalResult,
    adaptation_of,
    clamp_num_problems,
    eval_generator,
    evaluate,
    evaluate_and_report,
    problem_adapter_of,
    transcript_rows,
)
from metarl_llm.evaluation.report import plot_adaptation, plot_success_curves
from metarl_llm.jobs.common import base_policy, finished_summary, job_tracker, resume_checkpoint, start_job
from metarl_llm.models import (
    autocast,
    autocast_dtype,
    build_actor_critic,
    frozen_reference,
    merged_policy,
    set_cudnn_attention,
    set_temperature,
)
from metarl_llm.rl.advantages import combine_advantages, episode_credit, get_advantage
from metarl_llm.rl.bonus import episode_bonuses, j_curves
from metarl_llm.rl.losses import explained_variance
from metarl_llm.rl.scoring import score_batch, verifier_rewards
from metarl_llm.rl.update import ppo_update
from metarl_llm.rollout.engine import engine_from_config, run_trials
from metarl_llm.rollout.sampling import trial_keys
from metarl_llm.runtime.checkpoint import (
    load_model_weights,
    load_trainer_state,
    remove_partial,
    restore_rng_states,
    rng_states,
    save_checkpoint,
)
from metarl_llm.runtime.distributed import Dist, gather_batch, prepare_data_parallel
from metarl_llm.runtime.failures import failure_record
from metarl_llm.runtime.setup import heldout_env_maker
from metarl_llm.runtime.tracking import NullTracker
from metarl_llm.verify.model import check_same_vocabulary, load_verifier

log = logging.getLogger(__name__)


class EvalSummary(NamedTuple):
    """What the summary needs of an evaluation: its metrics and S(t) curve [C+1]."""

    metrics: dict
    curve: np.ndarray
    adaptation: dict | None = None  # metarl_llm.evaluation.adaptation figures (eval.adaptation)


@dataclass
class Throughput:
    """Running totals for the summary's tokens per second (saved in checkpoints, so a resumed
    run continues them): sampled policy tokens and rollout seconds, update tokens and seconds."""

    rollout_tokens: float = 0.0
    rollout_time: float = 0.0
    update_tokens: float = 0.0
    update_time: float = 0.0

    def as_list(self) -> list[float]:
        return [self.rollout_tokens, self.rollout_time, self.update_tokens, self.update_time]


@dataclass
class Rollout:
    """Stage 1's output on this process: its trials, the grader failures scored while playing
    them (``reward.on_error=score``) and the seconds it took."""

    trials: list
    env_failures: int
    seconds: float


@dataclass
class Scored:
    """Stages 2-5 on one iteration: the batch (global after stage 5) and the per-trial figures."""

    batch: RolloutBatch
    env_outcome: torch.Tensor  # [B] the environment's outcome, whatever the reward
    mismatch: float  # largest |scoring - sampling| log-prob (NaN when not measured)
    bonuses: list = field(default_factory=list)  # per trial, one bonus per episode
    curves: list | None = None  # per trial, J at each boundary (None: bonus.name=none)
    bonus_seconds: float = 0.0
    per_trial: dict = field(default_factory=dict)  # global lists: policy_tokens, episodes, forced, outcome, ...


def iteration_metrics(
    per_trial: dict,
    batch: RolloutBatch,
    env_outcome: torch.Tensor,
    stats: dict,
    *,
    n_trials: int,
    max_episodes: int,
    use_critic: bool,
    with_bonus: bool,
    mismatch: float,
    env_failures: float,
    curves: list | None,
    verifier_reward: bool,
) -> dict:
    """The ``train/*`` scalars of one iteration, from the global batch and per-trial figures.

    ``per_trial``: lists over the global batch's trials: ``policy_tokens``, ``episodes``,
    ``forced``, ``outcome``, ``answer_episode``, ``bonus`` (each trial's bonus sum).
    ``batch``: ``outcome`` [B] (the rewarded outcome), ``logprobs``, ``ref_logprobs``,
    ``values``, ``returns`` and ``action_mask`` [B, T]. ``env_outcome`` [B]: the environment's
    outcome. ``stats``: :func:`metarl_llm.rl.update.ppo_update`'s (``update_tokens`` left out).
    ``curves``: per trial, J at its boundaries (None without a bonus).
    """
    mask = batch.action_mask
    metrics = {
        "train/outcome": float(env_outcome.mean()),  # the environment's, whatever the reward
        "train/reward": float(batch.outcome.mean()),  # the outcome reward PPO optimised (reward.name)
        "train/bonus_return": float(np.mean(per_trial["bonus"])) if with_bonus else 0.0,
        "train/tokens_per_trial": sum(per_trial["policy_tokens"]) / n_trials,
        "train/episodes_per_trial": float(np.mean(per_trial["episodes"])),
        "train/forced_answer_rate": float(np.mean(per_trial["forced"])),
        "train/kl_ref": float(((batch.logprobs - batch.ref_logprobs) * mask).sum() / mask.sum()),
        "train/explained_variance": explained_variance(batch.values, batch.returns, mask) if use_critic else float("nan"),
        "train/logprob_mismatch_max": mismatch,
        "train/env_failures": env_failures,  # reward.on_error=score: grader failures scored instead of raised
        "train/nonfinite_skipped": stats["nonfinite_skipped"],
        **{f"train/{k}": v for k, v in stats.items() if k != "update_tokens"},
    }
    if verifier_reward:
        metrics["train/reward_verifier_accuracy"] = float(((batch.outcome >= 0.5) == (env_outcome >= 1.0)).float().mean())
    figures = episode_figures(per_trial["outcome"], per_trial["answer_episode"], curves, max_episodes)
    metrics.update({f"train/{k}": v for k, v in figures.items()})  # the names heldout/* uses too
    return metrics


PER_TRIAL_KEYS = ("policy_tokens", "episodes", "forced", "outcome", "answer_episode", "bonus", "bonuses", "env_outcome")


class PPOJob:
    """``job=ppo`` (``algo=ppo`` / ``algo=grpo``) in one run directory: :meth:`__init__` sets
    everything up, :meth:`run` loops :meth:`iteration` and finishes with the final evaluation and summary.

    The stages are methods, so a benchmark or a test can wrap one (a subclass, or
    ``monkeypatch.setattr(PPOJob, "update", ...)``) without reaching into the module's imports.
    """

    def __init__(self, cfg: TrainConfig, run_dir: Path, wandb_group: str | None = None, resume_from: Path | None = None):
        self.t_start = time.perf_counter()
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.resume_from = resume_from
        self.dist = Dist(cpu=cfg.device == "cpu" or not torch.cuda.is_available())  # world 1 without a launcher
        self.device = start_job(cfg, self.run_dir, write=self.dist.is_main)
        if self.dist.world > 1:
            self.device = self.dist.device
            log.info("process %d of %d on %s", self.dist.rank, self.dist.world, self.device)
        self.bar = None  # the progress bar of run()
        self._setup_models()
        self._setup_tracker(wandb_group)
        self._setup_rollout()
        self._setup_start()

    # ------------------------------------------------------------------ set-up

    def _setup_models(self) -> None:
        """Warm-started policy, actor-critic, reference, optimiser; resumed weights; the DDP wrap."""
        cfg, dist, device = self.cfg, self.dist, self.device
        if not dist.is_main:  # under a launcher the main process warm-starts first and fills the cache
            dist.barrier()
        policy, self.tokenizer, self.codec, self.make_env, self.ws_info = base_policy(cfg, device)
        if dist.is_main:
            dist.barrier()
        set_temperature(policy, cfg.model.temperature)  # the tempered policy everywhere (1.0: the raw logits)
        self.actor_critic = build_actor_critic(policy, cfg.model, cfg.seed).to(device)  # model.lora.r > 0: LoRA, base frozen
        self.reference = frozen_reference(self.actor_critic)  # LoRA: the same weights, adapter disabled (no copy)
        self.amp = autocast_dtype(cfg.model.autocast, device)  # forward passes of rollout, scoring and update (None: off)
        set_cudnn_attention(cfg.model.cudnn_attention)
        if self.amp is not None and cfg.algo.old_logprobs == "sampled":
            raise ValueError(
                f"algo.old_logprobs=sampled needs float32 scoring, but model.autocast={cfg.model.autocast} "
                f"resolves to {self.amp} on {device}: set model.autocast=off or algo.old_logprobs=recompute"
            )
        self.use_critic = cfg.algo.advantage == "gae"
        groups = [{"params": self.actor_critic.policy_parameters(), "lr": cfg.algo.lr}]
        if self.use_critic:
            groups.append({"params": self.actor_critic.critic_parameters(), "lr": cfg.algo.critic_lr})
        self.optimizer = torch.optim.AdamW(groups, weight_decay=cfg.algo.weight_decay)
        self.state = None
        if self.resume_from is not None:  # weights, critic and optimiser of the checkpoint
            self.state = load_trainer_state(self.resume_from)
            if self.state.get("warm_start_key") != self.ws_info.get("warm_start/key"):
                raise ValueError(
                    f"resume: {self.resume_from} was trained from warm start {self.state.get('warm_start_key')}, "
                    f"this config gives {self.ws_info.get('warm_start/key')}: the configs differ"
                )
            load_model_weights(self.actor_critic, self.resume_from, self.state)
            self.optimizer.load_state_dict(self.state["optimizer"])
            log.info("resuming from %s (iteration %d)", self.resume_from, self.state["iteration"])
        if cfg.resume and dist.is_main:
            for name in remove_partial(self.run_dir / "checkpoints"):
                log.warning("resume: removed the partial checkpoint %s left by the interrupted run", name)
        self.model = self.actor_critic  # what the update calls: DDP-wrapped (through accelerate) under a launcher
        if dist.world > 1:
            self.model, self.optimizer = prepare_data_parallel(dist, self.actor_critic, self.optimizer, self.use_critic)
        self.advantage_fn = get_advantage(cfg.algo.advantage)
        self.reward_verifier = None
        if cfg.reward.name == "verifier":
            self.reward_verifier = load_verifier(
                Path(cfg.reward.verifier).expanduser(), device, cfg.model.trust_remote_code
            ).eval()
            check_same_vocabulary(self.reward_verifier.tokenizer, self.tokenizer)

    def _setup_tracker(self, wandb_group: str | None) -> None:
        """metrics.jsonl and the W&B run. A resumed run drops what the interrupted one logged
        after its checkpoint (exactly the rows written after it was saved, those at its own
        iteration included; all of them when resume=auto found no checkpoint) and continues
        its W&B run."""
        cfg, state, run_dir = self.cfg, self.state, self.run_dir
        run_id_file = run_dir / "wandb_run_id"
        run_id = state.get("wandb_id") if state else None
        if run_id is None and cfg.resume and run_id_file.exists():
            run_id = run_id_file.read_text().strip() or None
        self.tracker = (
            job_tracker(
                cfg,
                run_dir,
                wandb_group,
                run_id=run_id,
                resume_step=state["iteration"] if state else (-1 if cfg.resume else None),
                resume_rows=state.get("metrics_rows") if state else None,
            )
            if self.dist.is_main
            else NullTracker()
        )
        if self.tracker.run_id:
            run_id_file.write_text(self.tracker.run_id)
        if self.dist.is_main:  # this run writes its own: a stale summary.json must not mark it finished if it is killed
            (run_dir / "summary.json").unlink(missing_ok=True)

    def _setup_rollout(self) -> None:
        """Random streams, this process's share of the problems, the engine and the environments."""
        cfg, dist = self.cfg, self.dist
        # Every process draws the same global numbers (problems, sampling keys, minibatch order).
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.problem_rng = np.random.default_rng(cfg.seed)
        clamp_num_problems(cfg.eval, self.make_env("test").unwrapped.num_problems)
        self.n_trials = cfg.algo.problems_per_iter * cfg.algo.group_size
        self.my_problems = dist.shard(cfg.algo.problems_per_iter, "algo.problems_per_iter")  # this process's share
        self.my_rows = slice(self.my_problems.start * cfg.algo.group_size, self.my_problems.stop * cfg.algo.group_size)
        self.engine = engine_from_config(cfg.rollout)
        # old_logprobs=sampled with a shared critic: the engine computes the values too, from the forward passes it
        # samples from (value head on their last hidden state), so scoring runs no policy forward. A separate critic
        # (its own trunk) or an engine that cannot (supports_values False) keeps the scoring forward.
        self.rollout_values = (
            self.use_critic
            and cfg.model.critic == "shared"
            and cfg.algo.old_logprobs == "sampled"
            and getattr(self.engine, "supports_values", False)
        )
        # The sample estimator's meta-prover continues from the rollout's KV caches (same model only).
        self.keep_cache = (
            cfg.rollout.reuse_cache
            and cfg.rollout.engine == "cached"
            and (cfg.bonus.name == "info_gain" or cfg.algo.advantage == "termination")
            and cfg.bonus.estimator == "sample"
            and not cfg.bonus.use_reference
        )
        # Grader exceptions are loud (reward.on_error=raise) or scored and counted (score).
        self.train_envs = [
            FailureGuard(self.make_env("train"), cfg.reward.on_error, cfg.reward.error_score)
            for _ in range(self.my_rows.stop - self.my_rows.start)
        ]
        self.eval_envs = (
            [FailureGuard(self.make_env("test")) for _ in range(cfg.eval.num_problems * cfg.eval.samples_per_problem)]
            if dist.is_main
            else []
        )

    def _setup_start(self) -> None:
        """The start's held-out evaluation, or what the interrupted run had drawn and counted."""
        state = self.state
        if state is None:
            start_eval = self.run_eval(0, "start")
            if self.dist.is_main:
                log.info("held-out success of the warm-started model: %.3f", start_eval.metrics["success"])
            self.tracker.log({k: v for k, v in self.ws_info.items() if isinstance(v, (int, float, bool))}, step=0)
            start_adapt = None
            if start_eval is not None:
                start_adapt = adaptation_of(self.actor_critic.policy, self.codec, self.cfg, heldout_env_maker(self.cfg))
                if start_adapt is not None:
                    self.tracker.log(adaptation_scalars(start_adapt), step=0)
            self.start_eval = EvalSummary(start_eval.metrics, start_eval.curve, start_adapt) if start_eval is not None else None
            self.first = 1
        else:
            restore_rng_states(state["rng"], self.generator, self.problem_rng)
            self.start_eval = (
                EvalSummary(
                    state["start_eval"]["metrics"],
                    np.asarray(state["start_eval"]["curve"]),
                    state["start_eval"].get("adaptation"),
                )
                if state["start_eval"]
                else None
            )
            self.first = state["iteration"] + 1
        self.throughput = Throughput(*state["counters"]) if state is not None else Throughput()

    # ------------------------------------------------------------------ evaluation and checkpoints

    def run_eval(self, iteration: int, label: str) -> EvalResult | None:
        """Held-out evaluation at the training budget (start and every ``eval.every`` iterations);
        on the main process only (None elsewhere), the others wait."""
        cfg, ac = self.cfg, self.actor_critic
        res = None
        if self.dist.is_main:
            adapter_policy = merged_policy(ac) if cfg.adapt.name == "ttt" else ac.policy
            res = evaluate(
                ac.policy,
                self.codec,
                self.eval_envs,
                cfg.budget,
                cfg.eval,
                eval_generator(cfg.seed),
                problem_adapter_of(cfg, adapter_policy, self.codec),
                engine=self.engine,
            )
            self.tracker.log({f"heldout/{k}": v for k, v in res.metrics.items()}, step=iteration)
            self.tracker.table(
                f"transcripts/{label}",
                TRANSCRIPT_COLUMNS,
                transcript_rows(res.trials, res.j_curves, cfg.logger.num_transcripts),
                step=iteration,
            )
        self.dist.barrier()
        return res

    def checkpoint(self, iteration: int) -> Path:
        """Save everything an exact resume needs (main process only)."""
        start_eval = self.start_eval
        extra = {
            "rng": rng_states(self.generator, self.problem_rng),
            "counters": self.throughput.as_list(),
            "start_eval": {
                "metrics": start_eval.metrics,
                "curve": np.asarray(start_eval.curve).tolist(),
                "adaptation": start_eval.adaptation,
            }
            if start_eval
            else None,
            "wandb_id": self.tracker.run_id,
            "warm_start_key": self.ws_info.get("warm_start/key"),
            "metrics_rows": self.tracker.rows,  # rows of metrics.jsonl so far: a resume keeps exactly these
            "config": self.cfg.to_yaml(),
        }
        return save_checkpoint(
            self.run_dir, iteration, self.actor_critic, self.tokenizer, self.optimizer, extra, keep=self.cfg.checkpoint_keep
        )

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict:
        """Iterations ``first..algo.iterations``, then the final evaluation; returns the summary
        ({} on the non-main processes)."""
        cfg = self.cfg
        self.bar = tqdm(
            range(self.first, cfg.algo.iterations + 1), desc="ppo", disable=not cfg.logger.progress_bar, dynamic_ncols=True
        )
        for it in self.bar:
            self.iteration(it)
        if not self.dist.is_main:  # the main process evaluates, reports and finishes the W&B run
            self.dist.barrier()
            return {}
        return self.finish()

    def iteration(self, it: int) -> dict:
        """One PPO iteration, the seven stages in order; returns the logged metrics."""
        t0 = time.perf_counter()
        roll = self.rollout(it)  # 1
        scored = self.score(roll)  # 2
        self.bonus(it, roll, scored)  # 3
        self.rewards_and_advantages(roll, scored)  # 4, 5
        stats, t_update = self.update(it, scored.batch)  # 6
        return self.log(it, roll, scored, stats, t_update, t0)  # 7

    def rollout(self, it: int) -> Rollout:
        """1. This process's trials: ``problems_per_iter`` problems x ``group_size`` (its share)."""
        cfg = self.cfg
        t0 = time.perf_counter()
        self.actor_critic.eval()
        seeds = self.problem_rng.integers(0, 2**31 - 1, size=cfg.algo.problems_per_iter)
        keys = trial_keys(self.n_trials, self.generator)  # the global batch's sampling keys; this process plays my_rows
        resets = [{"seed": int(seeds[p])} for p in self.my_problems for _ in range(cfg.algo.group_size)]
        group_ids = [p for p in self.my_problems for _ in range(cfg.algo.group_size)]
        failures_before = sum(e.failures for e in self.train_envs)
        with failure_record(self.run_dir, it), autocast(self.device, self.amp):  # model.autocast: the rollout too
            trials = run_trials(
                self.actor_critic.policy,
                self.codec,
                self.train_envs,
                resets,
                group_ids,
                cfg.budget,
                self.generator,
                engine=self.engine,
                keep_cache=self.keep_cache,
                keys=keys[self.my_rows],
                value_head=self.actor_critic.value_head if self.rollout_values else None,
            )
        env_failures = sum(e.failures for e in self.train_envs) - failures_before  # reward.on_error=score: scored, counted
        return Rollout(trials, env_failures, time.perf_counter() - t0)

    def score(self, roll: Rollout) -> Scored:
        """2. Old log-probs and values of the sampling policy, the reference's log-probs; the
        verifier's reward with ``reward=verifier``."""
        cfg, trials = self.cfg, roll.trials
        batch = collate(trials, self.codec.pad_id)
        width = batch.input_ids.shape[1]
        score_stats: dict = {}  # logprob_mismatch_max: NaN when old_logprobs=sampled skipped the policy's forward
        batch = score_batch(
            self.actor_critic,
            self.reference,
            batch,
            self.use_critic,
            amp_dtype=self.amp,
            sampling=sampled_logprobs(trials, width),
            old_logprobs=cfg.algo.old_logprobs,
            bucket_tokens=cfg.algo.length_bucket_tokens,
            stats=score_stats,
            sampled_values=sampled_values(trials, width) if self.rollout_values else None,
        )
        env_outcome = batch.outcome
        if self.reward_verifier is not None:  # reward=verifier: the verifier's P(success) replaces the outcome
            batch = batch._replace(outcome=verifier_rewards(self.reward_verifier, trials, cfg.reward.rows))
        return Scored(batch, env_outcome, score_stats["logprob_mismatch_max"])

    def bonus(self, it: int, roll: Rollout, scored: Scored) -> None:
        """3. Per-episode progress bonuses; J after the answer episode is the outcome being
        optimised (the verifier's with reward=verifier)."""
        cfg = self.cfg
        t0 = time.perf_counter()
        bonus_model = self.reference if cfg.bonus.use_reference else self.actor_critic.policy
        with failure_record(self.run_dir, it):
            scored.bonuses, scored.curves = episode_bonuses(
                cfg.bonus,
                bonus_model,
                self.codec,
                roll.trials,
                cfg.budget.answer_max_tokens,
                self.generator,
                outcomes=scored.batch.outcome.tolist(),
                engine=self.engine,
            )
            if scored.curves is None and cfg.algo.advantage == "termination":  # R_term without a bonus
                scored.curves = j_curves(
                    cfg.bonus, bonus_model, self.codec, roll.trials, cfg.budget.answer_max_tokens, self.generator, self.engine
                )
        for t in roll.trials:
            t.cache = None  # the kept KV caches served the meta-prover; free them before the update
        scored.bonus_seconds = time.perf_counter() - t0

    def rewards_and_advantages(self, roll: Rollout, scored: Scored) -> None:
        """4. Rewards on action tokens: outcome and KL (and, with ``bonus.credit=return``, the bonuses).
        5. Advantages: the registered estimator; then, over the global batch, the outcome advantages
        are whitened and (``bonus.credit=episode``, MRT) each episode's bonus is added to its own
        tokens' advantages in reward units (:func:`metarl_llm.rl.advantages.combine_advantages`).
        Under a launcher every process gets the global batch and per-trial figures here."""
        cfg, trials, batch = self.cfg, roll.trials, scored.batch
        in_reward = cfg.bonus.credit == "return"
        token_rewards = place_rewards(batch, scored.bonuses if in_reward else [], cfg.algo.kl_coef, cfg.algo.kl_in_reward)
        term = None
        if cfg.algo.advantage == "termination":  # MRT's baseline: J right before each token's episode
            term = episode_credit(batch.episode_index, batch.action_mask, [list(c) for c in scored.curves])
        adv, ret = self.advantage_fn(
            token_rewards,
            batch.values,
            batch.action_mask,
            gamma=cfg.algo.gamma,
            lam=cfg.algo.lam,
            group=batch.group,
            termination_value=term,
        )
        batch = batch._replace(token_rewards=token_rewards, advantages=adv, returns=ret)
        parts = self.dist.all_gather_objects(
            {
                "policy_tokens": [t.policy_tokens for t in trials],
                "episodes": [len(t.episode_texts) for t in trials],
                "forced": [t.forced for t in trials],
                "outcome": [t.outcome for t in trials],
                "answer_episode": [t.answer_episode for t in trials],
                "bonus": [sum(b) for b in scored.bonuses],
                "bonuses": [list(b) for b in scored.bonuses],
                "curves": [list(c) for c in scored.curves] if scored.curves is not None else None,
                "mismatch": scored.mismatch,
                "env_outcome": scored.env_outcome.tolist(),
            }
        )
        batch = gather_batch(self.dist, batch)
        glob = {k: [x for part in parts for x in part[k]] for k in PER_TRIAL_KEYS}
        credit = (
            episode_credit(batch.episode_index, batch.action_mask, glob["bonuses"])
            if not in_reward and cfg.bonus.name != "none"
            else None
        )
        scored.batch = batch._replace(
            advantages=combine_advantages(batch.advantages, batch.action_mask, credit, cfg.algo.whiten_advantages)
        )
        scored.curves = None if scored.curves is None else [c for part in parts for c in part["curves"]]
        scored.mismatch = max(part["mismatch"] for part in parts)
        scored.env_outcome = torch.tensor(glob["env_outcome"])
        scored.per_trial = glob

    def update(self, it: int, batch: RolloutBatch) -> tuple[dict, float]:
        """6. PPO epochs over minibatches. A non-finite reward, advantage or return stops the run
        with the batch saved (``algo.on_nonfinite=raise``) or skips this update (``skip``)."""
        t0 = time.perf_counter()
        self.model.train()
        finite = all(bool(torch.isfinite(x).all()) for x in (batch.outcome, batch.token_rewards, batch.advantages, batch.returns))
        with failure_record(self.run_dir, it, batch):
            if not finite:
                if self.cfg.algo.on_nonfinite != "skip":
                    raise FloatingPointError("non-finite reward, advantage or return in the rollout batch")
                stats = {"update_tokens": 0, "nonfinite_skipped": 1}  # this iteration's update is dropped
            else:
                stats = ppo_update(
                    self.model,
                    self.optimizer,
                    batch,
                    self.cfg.algo,
                    self.generator,
                    self.use_critic,
                    amp_dtype=self.amp,
                    dist=self.dist,
                )
        return stats, max(time.perf_counter() - t0, 1e-9)

    def log(self, it: int, roll: Rollout, scored: Scored, stats: dict, t_update: float, t0: float) -> dict:
        """7. Scalars to metrics.jsonl and W&B; held-out evaluation and checkpoints at intervals."""
        cfg = self.cfg
        sampled = sum(scored.per_trial["policy_tokens"])
        self.throughput.rollout_tokens += sampled
        self.throughput.rollout_time += roll.seconds
        self.throughput.update_tokens += stats["update_tokens"]
        self.throughput.update_time += t_update
        metrics = iteration_metrics(
            scored.per_trial,
            scored.batch,
            scored.env_outcome,
            stats,
            n_trials=self.n_trials,
            max_episodes=cfg.budget.max_episodes,
            use_critic=self.use_critic,
            with_bonus=cfg.bonus.name != "none",
            mismatch=scored.mismatch,
            env_failures=float(self.dist.all_sum(torch.tensor(float(roll.env_failures)))),
            curves=scored.curves,
            verifier_reward=self.reward_verifier is not None,
        )
        metrics.update(
            {
                "perf/rollout_tokens_per_s": sampled / roll.seconds,  # sampling policy tokens (all processes), env steps included
                "perf/update_tokens_per_s": stats["update_tokens"] / t_update,
                "perf/iteration_s": time.perf_counter() - t0,
                "perf/bonus_s": scored.bonus_seconds,
                "perf/rss_mb": psutil.Process().memory_info().rss / 2**20,  # resident memory of this process
            }
        )
        self.tracker.log(metrics, step=it)
        if self.bar is not None:
            self.bar.set_postfix(outcome=f"{metrics['train/outcome']:.2f}", tok=f"{metrics['train/tokens_per_trial']:.0f}")
        if cfg.eval.every and it % cfg.eval.every == 0 and it != cfg.algo.iterations:
            self.run_eval(it, f"iter_{it}")
        if cfg.checkpoint_every and it % cfg.checkpoint_every == 0 and it != cfg.algo.iterations and self.dist.is_main:
            self.checkpoint(it)
        return metrics

    # ------------------------------------------------------------------ the end

    def finish(self) -> dict:
        """Final checkpoint and evaluation, the start-vs-final plot, summary.json (main process).

        The final evaluation is the function ``python -m metarl_llm.evaluate`` calls on the saved
        checkpoint, with the same seeds, so re-evaluating it reproduces these figures (on the
        weights policy/ holds: merged, for a LoRA policy). Resumed from the final checkpoint
        (killed in the final evaluation): it is this one already."""
        cfg, state = self.cfg, self.state
        final_ckpt = (
            self.resume_from
            if state is not None and state["iteration"] == cfg.algo.iterations
            else self.checkpoint(cfg.algo.iterations)
        )
        t_final_eval = time.perf_counter()
        final_results, figures, _ = evaluate_and_report(
            merged_policy(self.actor_critic),
            self.codec,
            cfg,
            heldout_env_maker(cfg),
            self.run_dir,
            final_ckpt.name,
            self.tracker,
            cfg.algo.iterations,
        )
        t_final_eval = time.perf_counter() - t_final_eval
        final_eval = final_results["1"]
        plot = self.run_dir / "success_vs_tokens.png"
        plot_success_curves(
            {"start": self.start_eval.curve, "final": final_eval.curve},
            plot,
            title=f"{cfg.env.name}, held-out, training budget (C={len(final_eval.curve) - 1})",
        )
        self.tracker.image("heldout/success_vs_tokens", plot, step=cfg.algo.iterations)
        if self.start_eval.adaptation is not None and "adaptation" in figures:
            plot = self.run_dir / "adaptation.png"
            plot_adaptation({"start": self.start_eval.adaptation, "final": figures["adaptation"]}, plot,
                            title=f"{cfg.env.name}, held-out: in-context against parallel at equal tokens")  # fmt: skip
            self.tracker.image("heldout/adaptation_start_final", plot, step=cfg.algo.iterations)
        summary = {
            **run_summary(cfg, self.start_eval, final_eval.metrics, final_eval.curve, figures),
            "final_eval_s": t_final_eval,
            "wall_time_s": time.perf_counter() - self.t_start,
            "rollout_tokens_per_s": self.throughput.rollout_tokens / max(self.throughput.rollout_time, 1e-9),
            "update_tokens_per_s": self.throughput.update_tokens / max(self.throughput.update_time, 1e-9),
            "warm_start_cached": bool(self.ws_info.get("warm_start/cached", False)),
            "warm_start_s": float(self.ws_info.get("perf/warm_start_s", 0.0)),
            "num_parameters": sum(p.numel() for p in self.actor_critic.parameters()),
        }
        self.tracker.finish(summary)
        log.info("summary: %s", json.dumps(summary))
        self.dist.barrier()
        return summary


def run_summary(cfg: TrainConfig, start_eval: EvalSummary, final: dict, final_curve: np.ndarray, figures: dict) -> dict:
    """summary.json's figures of a PPO run (timings apart): the start and final held-out evaluation
    at the training budget (``final``: its metrics, ``final_curve``: its S(t)) and ``figures``, those of
    eval_<checkpoint>.json (regret, tokens_to_success(_level), maj_at_k, *_by_budget)."""
    return {
        "env": cfg.env.name,
        "bonus": cfg.bonus.name if cfg.bonus.name == "none" else f"{cfg.bonus.name}/{cfg.bonus.estimator}",
        "advantage": cfg.algo.advantage,
        "seed": cfg.seed,
        "iterations": cfg.algo.iterations,
        "heldout_success_start": start_eval.metrics["success"],
        "heldout_success_final": final["success"],
        "heldout_tokens_per_trial_start": start_eval.metrics["tokens_per_trial"],
        "heldout_tokens_per_trial": final["tokens_per_trial"],
        "heldout_episodes_per_trial": final["episodes_per_trial"],
        "heldout_pass_at_k": final[f"pass@{cfg.eval.samples_per_problem}"],
        "heldout_J_per_boundary": [final[k] for k in sorted(final) if k.startswith("J/boundary_")],
        "heldout_problems": cfg.eval.num_problems,
        "heldout_samples_per_problem": cfg.eval.samples_per_problem,
        **figures,
        "regret_start": start_eval.metrics["regret"],
        "heldout_success_curve_start": start_eval.curve.tolist(),
        # tokens the start model needs / tokens the final one needs, at 0.9 x the smaller final success (None: undefined or inf)
        "token_efficiency_vs_start": finite_or_none(token_efficiency_ratio(final_curve, start_eval.curve)),
        **({"adaptation_start": start_eval.adaptation} if start_eval.adaptation is not None else {}),
    }


def train_ppo_job(cfg: TrainConfig, run_dir: Path, wandb_group: str | None = None) -> dict:
    """``job=ppo`` (``algo=ppo`` / ``algo=grpo``): warm start, then PPO; write metrics.jsonl,
    checkpoints, plots and summary.json into ``run_dir`` (a finished run with ``resume`` is not
    redone)."""
    run_dir = Path(run_dir)
    finished = finished_summary(cfg, run_dir)
    if finished is not None:
        return finished
    resume_from = resume_checkpoint(cfg, run_dir)
    if resume_from is not None:
        run_dir = resume_from.parent.parent  # the interrupted run's directory: the run continues there
    return PPOJob(cfg, run_dir, wandb_group, resume_from).run()
