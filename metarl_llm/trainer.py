"""The training loop: warm start, then PPO over multi-episode trials.

One iteration:
  1. rollout   - ``problems_per_iter`` training problems x ``group_size`` trials, played
                 episode by episode against Gymnasium environments (metarl_llm.rollout);
  2. score     - one forward pass for the sampling policy's log-probs and values, one
                 for the frozen reference's log-probs (with algo.old_logprobs=sampled the
                 policy's is skipped: the rollout engine's sampling log-probs, and with a
                 shared critic the values it computed while sampling, are used instead);
  3. bonus     - per-episode progress bonuses (metarl_llm.bonus);
  4. rewards   - outcome and KL (and, with bonus.credit=return, the bonuses) placed on
                 action tokens (metarl_llm.batch);
  5. advantages- the registered estimator (metarl_llm.advantages); the outcome
                 advantages are whitened and, with the default bonus.credit=episode,
                 each episode's bonus is then added to the advantages of that episode's
                 own tokens (MRT's dense credit), in reward units, so that alpha keeps
                 its meaning (metarl_llm.advantages.combine_advantages);
  6. update    - PPO epochs over minibatches (metarl_llm.ppo);
  7. log       - scalars to metrics.jsonl and W&B; held-out evaluation and checkpoints
                 at intervals.

After the last iteration the final checkpoint is saved and evaluated with
``metarl_llm.evaluate.evaluate_and_report`` (held-out success-vs-tokens curves, regret,
token efficiency, maj@k at 0.5x..4x the training budget), the function the command
``python -m metarl_llm.evaluate`` runs, so re-evaluating that checkpoint reproduces
summary.json's figures.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import NamedTuple

import gymnasium as gym
import numpy as np
import psutil
import torch
from omegaconf import OmegaConf

import envs  # noqa: F401  (registers the environments)
from envs.base import EnvironmentFailure, FailureGuard
from metarl_llm.advantages import combine_advantages, episode_credit, get_advantage
from metarl_llm.batch import RolloutBatch, collate, length_buckets, place_rewards, sampled_logprobs, sampled_values
from metarl_llm.bonus import check_verifier_name, episode_bonuses, get_estimator
from metarl_llm.config import TrainConfig
from metarl_llm.evaluate import (
    TRANSCRIPT_COLUMNS,
    EvalResult,
    check_eval_config,
    clamp_num_problems,
    eval_generator,
    evaluate,
    evaluate_and_report,
    finite_or_none,
    plot_success_curves,
    problem_adapter_of,
    token_efficiency_ratio,
    transcript_rows,
)
from metarl_llm.models import (
    AUTOCAST_MODES,
    ActorCritic,
    autocast,
    autocast_dtype,
    build_actor_critic,
    enable_gradient_checkpointing,
    frozen_reference,
    load_policy,
    merged_policy,
    set_cudnn_attention,
    token_logprobs,
)
from metarl_llm.ppo import explained_variance, get_policy_loss, ppo_update
from metarl_llm.checkpoint import (find_checkpoint, load_model_weights, load_trainer_state, remove_partial,
                                   restore_rng_states, rng_states, save_checkpoint)
from metarl_llm.distributed import Dist, gather_batch, prepare_data_parallel
from metarl_llm.engine import engine_from_config, trial_keys
from metarl_llm.rollout import StreamCodec, run_trials
from metarl_llm.tracking import NullTracker, Tracker, read_summary
from metarl_llm.warm_start import warm_start

log = logging.getLogger(__name__)

BONUSES = ("none", "info_gain")
ALGOS = ("ppo", "grpo", "verifier", "sft")
REWARDS = ("env", "verifier")
OLD_LOGPROBS = ("recompute", "sampled")


def env_kwargs(cfg: TrainConfig) -> dict:
    """``gymnasium.make`` keyword arguments from the env config and the budget."""
    kw = {k: v for k, v in asdict(cfg.env).items() if k not in ("name", "id")}
    kw["max_episodes"] = cfg.budget.max_episodes
    return kw


def env_factory(cfg: TrainConfig):
    kw = env_kwargs(cfg)
    return lambda split: gym.make(cfg.env.id, split=split, **kw)


def heldout_env_maker(cfg: TrainConfig):
    """``budget -> held-out environment`` whose ``max_episodes`` follows that budget
    (the final evaluation runs at several budgets)."""
    return lambda budget: FailureGuard(env_factory(replace(cfg, budget=budget))("test"))  # grader failures are loud


def validate(cfg: TrainConfig) -> None:
    """Fail at start, naming the option, for values a schema type cannot rule out."""
    get_advantage(cfg.algo.advantage)
    get_policy_loss(cfg.algo.policy_loss)
    if cfg.bonus.name not in BONUSES:
        raise ValueError(f"bonus.name={cfg.bonus.name!r}; expected one of {BONUSES}")
    if cfg.bonus.credit not in ("episode", "return"):
        raise ValueError(f"bonus.credit={cfg.bonus.credit!r}; expected 'episode' or 'return'")
    if cfg.bonus.name != "none":
        get_estimator(cfg.bonus.estimator)
        if cfg.bonus.estimator == "verifier":
            check_verifier_name(cfg.bonus.verifier)
    if cfg.env.id not in gym.registry:
        raise ValueError(f"env.id={cfg.env.id!r} is not a registered environment; known: {sorted(k for k in gym.registry if k.startswith('metarl/'))}")
    if cfg.algo.advantage in ("grpo", "rloo") and cfg.algo.group_size < 2:
        raise ValueError(f"algo.advantage={cfg.algo.advantage} needs algo.group_size >= 2")
    for name in ("focused_fraction", "replay_fraction", "variety"):
        if not 0.0 <= getattr(cfg.warm_start, name) <= 1.0:
            raise ValueError(f"warm_start.{name} must be in [0, 1], got {getattr(cfg.warm_start, name)}")
    if cfg.warm_start.focused_until_loss < 0 or cfg.warm_start.focused_max_multiple < 1:
        raise ValueError(f"warm_start.focused_until_loss must be >= 0 (0: no extension) and warm_start.focused_max_multiple "
                         f">= 1, got {cfg.warm_start.focused_until_loss} and {cfg.warm_start.focused_max_multiple}")
    for name in ("iterations", "problems_per_iter", "group_size", "ppo_epochs", "minibatch_size"):
        if getattr(cfg.algo, name) < 1:
            raise ValueError(f"algo.{name} must be >= 1")
    if cfg.algo.micro_batch_tokens < 0:
        raise ValueError(f"algo.micro_batch_tokens must be >= 0 (0: one pass per minibatch), got {cfg.algo.micro_batch_tokens}")
    if cfg.algo.length_bucket_tokens < 0:
        raise ValueError(f"algo.length_bucket_tokens must be >= 0 (0: no grouping of rows by length), "
                         f"got {cfg.algo.length_bucket_tokens}")
    if cfg.algo.old_logprobs not in OLD_LOGPROBS:
        raise ValueError(f"algo.old_logprobs={cfg.algo.old_logprobs!r}; expected one of {OLD_LOGPROBS}")
    if cfg.algo.old_logprobs == "sampled" and (cfg.model.dtype != "float32" or cfg.model.autocast == "bf16"):
        raise ValueError(
            f"algo.old_logprobs=sampled takes the PPO ratio's old log-probs from the sampling passes, which match a "
            f"recomputation only in float32: it needs model.dtype=float32 and model.autocast off (got model.dtype="
            f"{cfg.model.dtype}, model.autocast={cfg.model.autocast}); or use algo.old_logprobs=recompute")
    cfg.model.lora.validate()
    if cfg.model.autocast not in AUTOCAST_MODES:
        raise ValueError(f"model.autocast={cfg.model.autocast!r}; expected one of {AUTOCAST_MODES}")
    b = cfg.budget
    if min(b.max_episode_tokens, b.max_total_tokens, b.answer_max_tokens) < 1:
        raise ValueError("budget token limits must be >= 1")
    check_eval_config(cfg.eval)
    if cfg.reward.on_error not in ("raise", "score"):
        raise ValueError(f"reward.on_error={cfg.reward.on_error!r}; expected 'raise' or 'score'")
    if cfg.algo.on_nonfinite not in ("raise", "skip"):
        raise ValueError(f"algo.on_nonfinite={cfg.algo.on_nonfinite!r}; expected 'raise' or 'skip'")
    if cfg.checkpoint_keep < 0:
        raise ValueError(f"checkpoint_keep must be >= 0, got {cfg.checkpoint_keep}")
    engine_from_config(cfg.rollout)
    if cfg.algo.name not in ALGOS:
        raise ValueError(f"algo.name={cfg.algo.name!r}; expected one of {ALGOS}")
    if cfg.adapt.name not in ("none", "ttt"):
        raise ValueError(f"adapt.name={cfg.adapt.name!r}; expected 'none' or 'ttt'")
    if cfg.adapt.name == "ttt":
        cfg.adapt.ttt.validate()
        if cfg.env.name != "arc":
            raise ValueError(f"adapt=ttt fits each problem's demonstrations: it needs env=arc, got env={cfg.env.name}")
    if cfg.reward.name not in REWARDS:
        raise ValueError(f"reward.name={cfg.reward.name!r}; expected one of {REWARDS}")
    if cfg.reward.name == "verifier":
        from metarl_llm.verifier import is_saved_verifier

        if not cfg.reward.verifier or not is_saved_verifier(Path(cfg.reward.verifier).expanduser()):
            raise ValueError(f"reward=verifier needs reward.verifier=<a saved verifier directory>, got {cfg.reward.verifier!r}")


def quiet_libraries() -> None:
    """Silence the libraries' own progress bars (dataset maps, shard writes); ours stays."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_warning()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device={name!r}; expected auto, cpu or cuda")
    return torch.device(name)


@torch.no_grad()
def score_batch(
    actor_critic: ActorCritic, reference: torch.nn.Module, batch: RolloutBatch, use_critic: bool, rows: int = 64,
    amp_dtype: torch.dtype | None = None, *, sampling: torch.Tensor | None = None, old_logprobs: str = "recompute",
    bucket_tokens: int = 0, stats: dict | None = None, sampled_values: torch.Tensor | None = None,
) -> RolloutBatch:
    """Fill ``logprobs``, ``values`` (sampling policy) and ``ref_logprobs`` (reference), [B, T]
    float32, 0 off action tokens. ``amp_dtype``: the forward passes run under that autocast.

    Forward passes take at most ``rows`` rows. With ``bucket_tokens`` > 0
    (``algo.length_bucket_tokens``) rows of similar length share a pass
    (:func:`metarl_llm.batch.length_buckets`), each pass trimmed to its own longest row;
    the results are put back in the batch's row order (0 on padding, as before).

    ``sampling`` [B, T]: the rollout engine's own log-probs of the sampled tokens
    (:func:`metarl_llm.batch.sampled_logprobs`). ``old_logprobs`` (``algo.old_logprobs``):
    ``recompute`` fills ``logprobs`` from a forward pass of the policy; ``sampled`` uses
    ``sampling`` (needed then) and runs the policy's forward only when values are needed
    (``use_critic``; its log-probs then feed the check below only) and not given as
    ``sampled_values`` [B, T] (:func:`metarl_llm.batch.sampled_values`: a shared critic's
    values computed by the rollout engine while sampling; only with ``old_logprobs='sampled'``
    and ``use_critic``): then no policy forward runs at all, only the reference's.
    ``stats``: a dict that receives ``logprob_mismatch_max``, the largest |forward - sampling|
    log-prob over action tokens: NaN when the policy's forward was skipped or ``sampling`` is None.
    """
    if old_logprobs not in OLD_LOGPROBS:
        raise ValueError(f"algo.old_logprobs={old_logprobs!r}; expected one of {OLD_LOGPROBS}")
    if old_logprobs == "sampled" and sampling is None:
        raise ValueError("score_batch: old_logprobs='sampled' needs the sampling log-probs (sampling=...)")
    if sampled_values is not None:
        if old_logprobs != "sampled" or not use_critic:
            raise ValueError(f"score_batch: sampled_values replace the policy forward's values only with "
                             f"old_logprobs='sampled' and a critic (got old_logprobs={old_logprobs!r}, use_critic={use_critic})")
        if sampled_values.shape != batch.input_ids.shape:
            raise ValueError(f"score_batch: sampled_values of shape {tuple(sampled_values.shape)}, the batch is "
                             f"{tuple(batch.input_ids.shape)}")
    device = next(actor_critic.parameters()).device
    policy_forward = old_logprobs == "recompute" or (use_critic and sampled_values is None)
    b, t = batch.input_ids.shape
    lp, vals, ref = torch.zeros((b, t)), torch.zeros((b, t)), torch.zeros((b, t))
    lengths = batch.attention_mask.sum(1)
    for part in length_buckets(lengths, bucket_tokens, max_rows=rows):
        width = max(1, int(lengths[part].max()))
        ids = batch.input_ids[part, :width].to(device)
        am = batch.attention_mask[part, :width].to(device)
        with autocast(device, amp_dtype):
            if policy_forward:
                out = actor_critic.score(ids, am, with_values=use_critic)
            ref_lp = reference(input_ids=ids, attention_mask=am, use_cache=False).logits[:, :-1]
        if policy_forward:
            lp[part, :width] = out.logprobs.float().cpu()
            vals[part, :width] = out.values.float().cpu()
        ref[part, 1:width] = token_logprobs(ref_lp, ids[:, 1:]).cpu()
    mask = batch.action_mask
    if stats is not None:
        stats["logprob_mismatch_max"] = (float(((lp - sampling).abs() * mask).max()) if policy_forward and sampling is not None
                                         and b else float("nan"))
    logprobs = sampling * mask if old_logprobs == "sampled" else lp * mask
    if sampled_values is not None:
        vals = sampled_values.float()
    return batch._replace(logprobs=logprobs, values=vals * mask, ref_logprobs=ref * mask)


@torch.no_grad()
def verifier_rewards(verifier, trials: list, rows: int) -> torch.Tensor:
    """reward=verifier: the verifier's P(success) of each whole trial, [B] float32 in [0, 1]."""
    from metarl_llm.verifier import score_trials

    return torch.as_tensor(score_trials(verifier, trials, rows=rows), dtype=torch.float32)


def save_failure(run_dir: Path, iteration: int, error: BaseException, batch: RolloutBatch | None = None) -> Path:
    """Write what a failure needs to be reproduced into ``run_dir/failures/``: a JSON
    record (iteration, error, traceback, and for an environment failure the problem id
    and the offending text) and, when given, the rollout batch (``torch.load``-able).
    Returns the JSON record's path."""
    import traceback

    out = Path(run_dir) / "failures"
    out.mkdir(parents=True, exist_ok=True)
    stem = f"iter_{iteration:06d}_{type(error).__name__}"
    record = {"iteration": iteration, "error": f"{type(error).__name__}: {error}",
              "traceback": "".join(traceback.format_exception(error))}
    if isinstance(error, EnvironmentFailure):
        record.update(problem_id=error.problem_id, text=error.text, episode=error.episode, cause=error.cause_repr)
    if batch is not None:
        torch.save(batch._asdict(), out / f"{stem}_batch.pt")
        record["batch"] = str(out / f"{stem}_batch.pt")
    path = out / f"{stem}.json"
    path.write_text(json.dumps(record, indent=2))
    log.error("iteration %d failed (%s); saved %s", iteration, record["error"][:200], path)
    return path


class EvalSummary(NamedTuple):
    """What the summary needs of an evaluation: its metrics and S(t) curve [C+1]."""

    metrics: dict
    curve: np.ndarray


def resume_checkpoint(cfg: TrainConfig, run_dir: Path) -> Path | None:
    """The checkpoint ``cfg.resume`` names: None (no resume), ``auto`` (this run
    directory's latest complete checkpoint; None when there is none yet) or a path to a
    run directory or checkpoint (an error when it holds no complete checkpoint)."""
    if not cfg.resume:
        return None
    found = find_checkpoint(run_dir if cfg.resume == "auto" else cfg.resume)
    if found is None:
        if cfg.resume != "auto":
            raise ValueError(f"resume={cfg.resume}: no complete checkpoint there")
        log.info("resume=auto: no complete checkpoint in %s yet; starting from the beginning", run_dir)
    return found


def finished_summary(cfg: TrainConfig, run_dir: Path) -> dict | None:
    """With ``resume=auto`` (or ``resume=<a run directory>``): that run's summary.json when
    the run already finished (summary.json complete, for this config's iterations, seed and
    env), else None. A finished run is not redone: a run killed after writing its summary,
    before its process exited, is complete. (``resume=<a checkpoint>`` always continues from it.)"""
    if not cfg.resume:
        return None
    target = Path(run_dir) if cfg.resume == "auto" else Path(cfg.resume).expanduser()
    if target.parent.name == "checkpoints":  # checkpoints/iter_XXXXXX: resume from it, as asked
        return None
    summary = read_summary(target)
    if summary is None or (summary.get("iterations"), summary.get("seed"), summary.get("env")) != (
            cfg.algo.iterations, cfg.seed, cfg.env.name):
        return None
    log.info("resume=%s: the run in %s is already complete (summary.json); nothing to do", cfg.resume, target)
    return summary


def base_policy(cfg: TrainConfig, device: torch.device):
    """The policy a job starts from: loaded (``model``) and warm-started (``warm_start``,
    seeded ``warm_start.seed`` or the run's seed). Returns (policy, tokenizer, codec,
    env_factory, warm-start info)."""
    ws_seed = cfg.seed if cfg.warm_start.seed is None else cfg.warm_start.seed
    policy, tokenizer = load_policy(cfg.model, ws_seed)
    codec = StreamCodec(tokenizer, "\n", cfg.env.forced_answer_text)
    make_env = env_factory(cfg)
    # The cache key leaves out what concerns PPO only (LoRA, autocast, the attention backend).
    policy, ws_info = warm_start(policy, tokenizer, codec, make_env, cfg.model, cfg.env, cfg.budget, cfg.warm_start, ws_seed)
    if cfg.model.gradient_checkpointing:  # the warm start hands back a freshly loaded model
        enable_gradient_checkpointing(policy)
    return policy.to(device), tokenizer, codec, make_env, ws_info


def start_job(cfg: TrainConfig, run_dir: Path, write: bool = True) -> torch.device:
    """Validate, set threads and seeds; create ``run_dir`` and write config.yaml there
    (``write``: False on the non-main processes of a launch); the device."""
    validate(cfg)
    if write:
        run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    quiet_libraries()
    seed_everything(cfg.seed)
    if write:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    return resolve_device(cfg.device)


def train(cfg: TrainConfig, run_dir: Path, wandb_group: str | None = None) -> dict:
    """Run warm start and PPO (or, with ``algo=verifier``, verifier training); write
    metrics.jsonl, checkpoints, plots and summary.json into ``run_dir``."""
    if cfg.algo.name == "verifier":
        return train_verifier_job(cfg, Path(run_dir), wandb_group)
    if cfg.algo.name == "sft":
        return train_sft_job(cfg, Path(run_dir), wandb_group)
    t_start = time.perf_counter()
    run_dir = Path(run_dir)
    finished = finished_summary(cfg, run_dir)
    if finished is not None:
        return finished
    resume_from = resume_checkpoint(cfg, run_dir)
    if resume_from is not None:
        run_dir = resume_from.parent.parent  # the interrupted run's directory: the run continues there
    dist = Dist(cpu=cfg.device == "cpu" or not torch.cuda.is_available())  # world 1 without a launcher
    device = start_job(cfg, run_dir, write=dist.is_main)
    if dist.world > 1:
        device = dist.device
        log.info("process %d of %d on %s", dist.rank, dist.world, device)

    # -- models (under a launcher the main process warm-starts first and fills the cache)
    if not dist.is_main:
        dist.barrier()
    policy, tokenizer, codec, make_env, ws_info = base_policy(cfg, device)
    if dist.is_main:
        dist.barrier()
    actor_critic = build_actor_critic(policy, cfg.model, cfg.seed).to(device)  # model.lora.r > 0: LoRA added, base frozen
    reference = frozen_reference(actor_critic)  # LoRA: the same weights, adapter disabled (no copy)
    amp = autocast_dtype(cfg.model.autocast, device)  # forward passes of rollout, scoring and update (None: off)
    set_cudnn_attention(cfg.model.cudnn_attention)
    if amp is not None and cfg.algo.old_logprobs == "sampled":
        raise ValueError(f"algo.old_logprobs=sampled needs float32 scoring, but model.autocast={cfg.model.autocast} "
                         f"resolves to {amp} on {device}: set model.autocast=off or algo.old_logprobs=recompute")
    use_critic = cfg.algo.advantage == "gae"
    groups = [{"params": actor_critic.policy_parameters(), "lr": cfg.algo.lr}]
    if use_critic:
        groups.append({"params": actor_critic.critic_parameters(), "lr": cfg.algo.critic_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.algo.weight_decay)
    state = None
    if resume_from is not None:  # weights, critic and optimiser of the checkpoint
        state = load_trainer_state(resume_from)
        if state.get("warm_start_key") != ws_info.get("warm_start/key"):
            raise ValueError(f"resume: {resume_from} was trained from warm start {state.get('warm_start_key')}, "
                             f"this config gives {ws_info.get('warm_start/key')}: the configs differ")
        load_model_weights(actor_critic, resume_from, state)
        optimizer.load_state_dict(state["optimizer"])
        log.info("resuming from %s (iteration %d)", resume_from, state["iteration"])
    if cfg.resume and dist.is_main:
        for name in remove_partial(run_dir / "checkpoints"):
            log.warning("resume: removed the partial checkpoint %s left by the interrupted run", name)
    model = actor_critic  # what the update calls: DDP-wrapped (through accelerate) under a launcher
    if dist.world > 1:
        model, optimizer = prepare_data_parallel(dist, actor_critic, optimizer, use_critic)
    advantage_fn = get_advantage(cfg.algo.advantage)
    reward_verifier = None
    if cfg.reward.name == "verifier":
        from metarl_llm.verifier import check_same_vocabulary, load_verifier

        reward_verifier = load_verifier(Path(cfg.reward.verifier).expanduser(), device, cfg.model.trust_remote_code).eval()
        check_same_vocabulary(reward_verifier.tokenizer, tokenizer)

    if wandb_group and not cfg.logger.group:
        cfg.logger.group = wandb_group  # the runs of one sweep share a W&B group
    # A resumed run drops what the interrupted one logged after its checkpoint (exactly the rows
    # written after it was saved, those at its own iteration included; all of them when
    # resume=auto found no checkpoint) and continues its W&B run.
    run_id_file = run_dir / "wandb_run_id"
    run_id = state.get("wandb_id") if state else None
    if run_id is None and cfg.resume and run_id_file.exists():
        run_id = run_id_file.read_text().strip() or None
    tracker = (Tracker(cfg.logger, run_dir, OmegaConf.to_container(OmegaConf.structured(cfg)), run_dir.name,
                       resume_step=state["iteration"] if state else (-1 if cfg.resume else None), run_id=run_id,
                       resume_rows=state.get("metrics_rows") if state else None)
               if dist.is_main else NullTracker())
    if tracker.run_id:
        run_id_file.write_text(tracker.run_id)
    if dist.is_main:  # this run writes its own: a stale summary.json must not mark it finished if it is killed
        (run_dir / "summary.json").unlink(missing_ok=True)
    # Every process draws the same global numbers (problems, sampling keys, minibatch order).
    generator = torch.Generator().manual_seed(cfg.seed)
    problem_rng = np.random.default_rng(cfg.seed)
    clamp_num_problems(cfg.eval, make_env("test").unwrapped.num_problems)
    n_trials = cfg.algo.problems_per_iter * cfg.algo.group_size
    my_problems = dist.shard(cfg.algo.problems_per_iter, "algo.problems_per_iter")  # this process's share
    my_rows = slice(my_problems.start * cfg.algo.group_size, my_problems.stop * cfg.algo.group_size)
    engine = engine_from_config(cfg.rollout)
    # old_logprobs=sampled with a shared critic: the engine computes the values too, from the forward passes it
    # samples from (value head on their last hidden state), so scoring runs no policy forward. A separate critic
    # (its own trunk) or an engine that cannot (supports_values False) keeps the scoring forward.
    rollout_values = (use_critic and cfg.model.critic == "shared" and cfg.algo.old_logprobs == "sampled"
                      and getattr(engine, "supports_values", False))
    # The sample estimator's meta-prover continues from the rollout's KV caches (same model only).
    keep_cache = (cfg.rollout.reuse_cache and cfg.rollout.engine == "cached" and cfg.bonus.name == "info_gain"
                  and cfg.bonus.estimator == "sample" and not cfg.bonus.use_reference)
    # Grader exceptions are loud (reward.on_error=raise) or scored and counted (score).
    train_envs = [FailureGuard(make_env("train"), cfg.reward.on_error, cfg.reward.error_score)
                  for _ in range(my_rows.stop - my_rows.start)]
    eval_envs = [FailureGuard(make_env("test")) for _ in range(cfg.eval.num_problems * cfg.eval.samples_per_problem)] if dist.is_main else []

    def run_eval(iteration: int, label: str) -> EvalResult:
        """Held-out evaluation at the training budget (start and every ``eval.every`` iterations);
        on the main process only (None elsewhere), the others wait."""
        res = None
        if dist.is_main:
            res = evaluate(actor_critic.policy, codec, eval_envs, cfg.budget, cfg.eval, eval_generator(cfg.seed),
                           problem_adapter_of(cfg, merged_policy(actor_critic) if cfg.adapt.name == "ttt" else actor_critic.policy, codec))
            tracker.log({f"heldout/{k}": v for k, v in res.metrics.items()}, step=iteration)
            tracker.table(f"transcripts/{label}", TRANSCRIPT_COLUMNS, transcript_rows(res.trials, res.j_curves, cfg.logger.num_transcripts), step=iteration)
        dist.barrier()
        return res

    if state is None:
        start_eval = run_eval(0, "start")
        if dist.is_main:
            log.info("held-out success of the warm-started model: %.3f", start_eval.metrics["success"])
        tracker.log({k: v for k, v in ws_info.items() if isinstance(v, (int, float, bool))}, step=0)
        start_eval = EvalSummary(start_eval.metrics, start_eval.curve) if start_eval is not None else None
        first = 1
    else:  # everything the interrupted run had drawn and counted
        restore_rng_states(state["rng"], generator, problem_rng)
        start_eval = EvalSummary(state["start_eval"]["metrics"], np.asarray(state["start_eval"]["curve"])) if state["start_eval"] else None
        first = state["iteration"] + 1

    def checkpoint(iteration: int) -> Path:
        """Save everything an exact resume needs (main process only)."""
        extra = {
            "rng": rng_states(generator, problem_rng),
            "counters": [rollout_tokens, rollout_time, update_tokens, update_time],
            "start_eval": {"metrics": start_eval.metrics, "curve": np.asarray(start_eval.curve).tolist()} if start_eval else None,
            "wandb_id": tracker.run_id, "warm_start_key": ws_info.get("warm_start/key"),
            "metrics_rows": tracker.rows,  # rows of metrics.jsonl so far: a resume keeps exactly these
            "config": OmegaConf.to_yaml(OmegaConf.structured(cfg)),
        }
        return save_checkpoint(run_dir, iteration, actor_critic, tokenizer, optimizer, extra, keep=cfg.checkpoint_keep)

    from tqdm.auto import tqdm

    bar = tqdm(range(first, cfg.algo.iterations + 1), desc="ppo", disable=not cfg.logger.progress_bar, dynamic_ncols=True)
    rollout_tokens = rollout_time = update_tokens = update_time = 0.0
    if state is not None:
        rollout_tokens, rollout_time, update_tokens, update_time = state["counters"]
    for it in bar:
        # 1. rollout
        t0 = time.perf_counter()
        actor_critic.eval()
        seeds = problem_rng.integers(0, 2**31 - 1, size=cfg.algo.problems_per_iter)
        keys = trial_keys(n_trials, generator)  # the global batch's sampling keys; this process plays my_rows
        resets = [{"seed": int(seeds[p])} for p in my_problems for _ in range(cfg.algo.group_size)]
        group_ids = [p for p in my_problems for _ in range(cfg.algo.group_size)]
        env_failures = sum(e.failures for e in train_envs)
        try:
            with autocast(device, amp):  # model.autocast: the rollout's forward passes too (bf16 on CUDA by default)
                trials = run_trials(actor_critic.policy, codec, train_envs, resets, group_ids, cfg.budget, generator,
                                    engine=engine, keep_cache=keep_cache, keys=keys[my_rows],
                                    value_head=actor_critic.value_head if rollout_values else None)
        except EnvironmentFailure as e:
            e.args = (f"{e.args[0]}; the problem id and text are saved in {save_failure(run_dir, it, e)}",)
            raise
        env_failures = sum(e.failures for e in train_envs) - env_failures  # reward.on_error=score: scored, counted
        t_generate = time.perf_counter() - t0
        # 2. score
        batch = collate(trials, codec.pad_id)
        stream_width = batch.input_ids.shape[1]
        score_stats: dict = {}  # logprob_mismatch_max: NaN when old_logprobs=sampled skipped the policy's forward
        batch = score_batch(actor_critic, reference, batch, use_critic, amp_dtype=amp,
                            sampling=sampled_logprobs(trials, stream_width), old_logprobs=cfg.algo.old_logprobs,
                            bucket_tokens=cfg.algo.length_bucket_tokens, stats=score_stats,
                            sampled_values=sampled_values(trials, stream_width) if rollout_values else None)
        env_outcome = batch.outcome
        if reward_verifier is not None:  # reward=verifier: the verifier's P(success) replaces the outcome
            batch = batch._replace(outcome=verifier_rewards(reward_verifier, trials, cfg.reward.rows))
        mismatch = score_stats["logprob_mismatch_max"]
        # 3. bonus
        t_bonus = time.perf_counter()
        bonus_model = reference if cfg.bonus.use_reference else actor_critic.policy
        try:
            # J after the answer episode is the outcome being optimised (the verifier's with reward=verifier)
            bonuses, curves = episode_bonuses(cfg.bonus, bonus_model, codec, trials, cfg.budget.answer_max_tokens, generator,
                                              outcomes=batch.outcome.tolist())
        except EnvironmentFailure as e:
            e.args = (f"{e.args[0]}; the problem id and text are saved in {save_failure(run_dir, it, e)}",)
            raise
        for t in trials:
            t.cache = None  # the kept KV caches served the meta-prover; free them before the update
        t_bonus = time.perf_counter() - t_bonus
        # 4. rewards
        in_reward = cfg.bonus.credit == "return"
        token_rewards = place_rewards(batch, bonuses if in_reward else [], cfg.algo.kl_coef, cfg.algo.kl_in_reward)
        # 5. advantages: the registered estimator on the rewards above; then, over the global batch,
        # the outcome advantages are whitened and (bonus.credit=episode, MRT) each episode's bonus is
        # added to its own tokens' advantages in reward units (metarl_llm.advantages.combine_advantages).
        adv, ret = advantage_fn(
            token_rewards, batch.values, batch.action_mask, gamma=cfg.algo.gamma, lam=cfg.algo.lam, group=batch.group
        )
        batch = batch._replace(token_rewards=token_rewards, advantages=adv, returns=ret)
        # Multi-process: every process gets the global batch (and the per-trial figures to log).
        per_trial = dist.all_gather_objects({
            "policy_tokens": [t.policy_tokens for t in trials], "episodes": [len(t.episode_texts) for t in trials],
            "forced": [t.forced for t in trials], "outcome": [t.outcome for t in trials],
            "answer_episode": [t.answer_episode for t in trials], "bonus": [sum(b) for b in bonuses],
            "bonuses": [list(b) for b in bonuses],
            "curves": [list(c) for c in curves] if curves is not None else None, "mismatch": mismatch,
            "env_outcome": env_outcome.tolist(),
        })
        batch = gather_batch(dist, batch)
        glob = {k: [x for part in per_trial for x in part[k]] for k in ("policy_tokens", "episodes", "forced", "outcome",
                                                                         "answer_episode", "bonus", "bonuses", "env_outcome")}
        credit = (episode_credit(batch.episode_index, batch.action_mask, glob["bonuses"])
                  if not in_reward and cfg.bonus.name != "none" else None)
        batch = batch._replace(advantages=combine_advantages(batch.advantages, batch.action_mask, credit,
                                                             cfg.algo.whiten_advantages))
        curves = None if curves is None else [c for part in per_trial for c in part["curves"]]
        mismatch = max(part["mismatch"] for part in per_trial)
        env_outcome = torch.tensor(glob["env_outcome"])
        sampled = sum(glob["policy_tokens"])
        # 6. update (a non-finite reward, loss or gradient stops the run with the batch saved, or is skipped)
        t1 = time.perf_counter()
        model.train()
        finite = all(bool(torch.isfinite(x).all()) for x in (batch.outcome, batch.token_rewards, batch.advantages, batch.returns))
        try:
            if not finite:
                if cfg.algo.on_nonfinite != "skip":
                    raise FloatingPointError("non-finite reward, advantage or return in the rollout batch")
                stats = {"update_tokens": 0, "nonfinite_skipped": 1}  # this iteration's update is dropped
            else:
                stats = ppo_update(model, optimizer, batch, cfg.algo, generator, use_critic, amp_dtype=amp, dist=dist)
        except FloatingPointError as e:
            path = save_failure(run_dir, it, e, batch)
            raise FloatingPointError(f"iteration {it}: {e}; the batch is saved in {path}") from e
        t_update = max(time.perf_counter() - t1, 1e-9)
        # 7. log
        rollout_tokens += sampled
        rollout_time += t_generate
        update_tokens += stats["update_tokens"]
        update_time += t_update
        mask = batch.action_mask
        bonus_return = float(np.mean(glob["bonus"])) if cfg.bonus.name != "none" else 0.0
        metrics = {
            "train/outcome": float(env_outcome.mean()),  # the environment's, whatever the reward
            "train/reward": float(batch.outcome.mean()),  # the outcome reward PPO optimised (reward.name)
            "train/bonus_return": bonus_return,
            "train/tokens_per_trial": sampled / n_trials,
            "train/episodes_per_trial": float(np.mean(glob["episodes"])),
            "train/forced_answer_rate": float(np.mean(glob["forced"])),
            "train/kl_ref": float(((batch.logprobs - batch.ref_logprobs) * mask).sum() / mask.sum()),
            "train/explained_variance": explained_variance(batch.values, batch.returns, mask) if use_critic else float("nan"),
            "train/logprob_mismatch_max": mismatch,
            "train/env_failures": float(dist.all_sum(torch.tensor(float(env_failures)))),  # reward.on_error=score
            "train/nonfinite_skipped": stats["nonfinite_skipped"],
            **{f"train/{k}": v for k, v in stats.items() if k != "update_tokens"},
            "perf/rollout_tokens_per_s": sampled / t_generate,  # sampling policy tokens (all processes), env steps included
            "perf/update_tokens_per_s": stats["update_tokens"] / t_update,
            "perf/iteration_s": time.perf_counter() - t0,
            "perf/bonus_s": t_bonus,
            "perf/rss_mb": psutil.Process().memory_info().rss / 2**20,  # resident memory of this process
        }
        if reward_verifier is not None:
            metrics["train/reward_verifier_accuracy"] = float(((batch.outcome >= 0.5) == (env_outcome >= 1.0)).float().mean())
        if curves is not None:
            width = max(len(c) for c in curves)
            for b in range(width):
                metrics[f"train/J_boundary_{b}"] = float(np.mean([c[b] for c in curves if len(c) > b]))
        for j in range(cfg.budget.max_episodes + 1):
            metrics[f"train/success_after_episode_{j}"] = float(
                np.mean([o >= 1.0 and 0 <= a <= j for o, a in zip(glob["outcome"], glob["answer_episode"])])
            )
        tracker.log(metrics, step=it)
        bar.set_postfix(outcome=f"{metrics['train/outcome']:.2f}", tok=f"{metrics['train/tokens_per_trial']:.0f}")
        if cfg.eval.every and it % cfg.eval.every == 0 and it != cfg.algo.iterations:
            run_eval(it, f"iter_{it}")
        if cfg.checkpoint_every and it % cfg.checkpoint_every == 0 and it != cfg.algo.iterations and dist.is_main:
            checkpoint(it)

    if not dist.is_main:  # the main process evaluates, reports and finishes the W&B run
        dist.barrier()
        return {}
    # Final evaluation: the function `python -m metarl_llm.evaluate` calls on the saved
    # checkpoint, with the same seeds, so re-evaluating it reproduces these figures
    # (on the weights policy/ holds: merged, for a LoRA policy).
    # Resumed from the final checkpoint (killed in the final evaluation): it is this one already.
    final_ckpt = (resume_from if state is not None and state["iteration"] == cfg.algo.iterations
                  else checkpoint(cfg.algo.iterations))
    t_final_eval = time.perf_counter()
    final_results, figures, _ = evaluate_and_report(
        merged_policy(actor_critic), codec, cfg, heldout_env_maker(cfg), run_dir, final_ckpt.name, tracker, cfg.algo.iterations
    )
    t_final_eval = time.perf_counter() - t_final_eval
    final_eval = final_results["1"]
    plot = run_dir / "success_vs_tokens.png"
    plot_success_curves({"start": start_eval.curve, "final": final_eval.curve}, plot,
                        title=f"{cfg.env.name}, held-out, training budget (C={len(final_eval.curve) - 1})")
    tracker.image("heldout/success_vs_tokens", plot, step=cfg.algo.iterations)
    summary = {
        "env": cfg.env.name,
        "bonus": cfg.bonus.name if cfg.bonus.name == "none" else f"{cfg.bonus.name}/{cfg.bonus.estimator}",
        "advantage": cfg.algo.advantage,
        "seed": cfg.seed,
        "iterations": cfg.algo.iterations,
        "heldout_success_start": start_eval.metrics["success"],
        "heldout_success_final": final_eval.metrics["success"],
        "heldout_tokens_per_trial_start": start_eval.metrics["tokens_per_trial"],
        "heldout_tokens_per_trial": final_eval.metrics["tokens_per_trial"],
        "heldout_episodes_per_trial": final_eval.metrics["episodes_per_trial"],
        "heldout_pass_at_k": final_eval.metrics[f"pass@{cfg.eval.samples_per_problem}"],
        "heldout_J_per_boundary": [final_eval.metrics[k] for k in sorted(final_eval.metrics) if k.startswith("J/boundary_")],
        "heldout_problems": cfg.eval.num_problems,
        "heldout_samples_per_problem": cfg.eval.samples_per_problem,
        **figures,  # regret, tokens_to_success(_level), maj_at_k, *_by_budget: equal to eval_<checkpoint>.json's
        "regret_start": start_eval.metrics["regret"],
        "heldout_success_curve_start": start_eval.curve.tolist(),
        # tokens the start model needs / tokens the final one needs, at 0.9 x the smaller final success (None: undefined or inf)
        "token_efficiency_vs_start": finite_or_none(token_efficiency_ratio(final_eval.curve, start_eval.curve)),
        "final_eval_s": t_final_eval,
        "wall_time_s": time.perf_counter() - t_start,
        "rollout_tokens_per_s": rollout_tokens / max(rollout_time, 1e-9),
        "update_tokens_per_s": update_tokens / max(update_time, 1e-9),
        "warm_start_cached": bool(ws_info.get("warm_start/cached", False)),
        "num_parameters": sum(p.numel() for p in actor_critic.parameters()),
    }
    tracker.finish(summary)
    log.info("summary: %s", json.dumps(summary))
    dist.barrier()
    return summary


def train_verifier_job(cfg: TrainConfig, run_dir: Path, wandb_group: str | None = None) -> dict:
    """``algo=verifier``: warm-start the base policy as PPO would, then train a verifier on
    its trials and measure best-of-N (metarl_llm.verifier.run_verifier_training). Writes
    ``verifier/`` (usable as ``bonus.estimator=verifier bonus.verifier=RUN/verifier``),
    ``best_of_n.png``, ``verifier_summary.json``, metrics.jsonl and summary.json."""
    from metarl_llm.verifier import build_verifier, run_verifier_training

    t_start = time.perf_counter()
    device = start_job(cfg, run_dir)
    policy, tokenizer, codec, make_env, ws_info = base_policy(cfg, device)
    v = cfg.verifier
    verifier = build_verifier(tokenizer, v.name_or_path, policy=policy, tiny=v.tiny, seed=cfg.seed, dtype=v.dtype,
                              trust_remote_code=cfg.model.trust_remote_code).to(device)
    if wandb_group and not cfg.logger.group:
        cfg.logger.group = wandb_group
    tracker = Tracker(cfg.logger, run_dir, OmegaConf.to_container(OmegaConf.structured(cfg)), run_dir.name)
    diag = base_diagnostics(cfg, policy, codec, make_env, tracker.log)
    result = run_verifier_training(policy, codec, make_env, verifier, cfg.budget, v, torch.Generator().manual_seed(cfg.seed),
                                   run_dir, tracker.log, cfg.logger.progress_bar)
    tracker.image("verifier/best_of_n", Path(result["best_of_n_plot"]), step=v.steps)
    summary = {"env": cfg.env.name, "algo": "verifier", "seed": cfg.seed, **diag, **result,
               "warm_start_cached": bool(ws_info.get("warm_start/cached", False)),
               "wall_time_s": time.perf_counter() - t_start}
    tracker.finish(summary)
    log.info("verifier: held-out accuracy %.3f, ECE %.3f; best-of-N %s", summary.get("heldout/accuracy", float("nan")),
             summary.get("heldout/ece", float("nan")), result["best_of_n"].get("best_of_n"))
    return summary


def base_diagnostics(cfg: TrainConfig, policy, codec: StreamCodec, make_env, log_fn) -> dict:
    """Heterogeneity and anti-concentration of the base policy on held-out problems
    (metarl_llm.diagnostics, settings ``cfg.diagnostics``), logged as ``diagnostics/...``
    at step 0. Returns those scalars ({} when disabled)."""
    from metarl_llm.diagnostics import policy_diagnostics

    d = cfg.diagnostics
    if not d.enabled:
        return {}
    t0 = time.perf_counter()
    size = make_env("test").unwrapped.num_problems
    num = min(d.num_problems, size) if size is not None else d.num_problems
    envs = [make_env("test") for _ in range(num * d.num_continuations)]
    out = policy_diagnostics(policy, codec, envs, cfg.budget, num, d.num_continuations, d.num_rollouts, d.margin,
                             torch.Generator().manual_seed(cfg.seed))
    scalars = {f"diagnostics/{k}": v for k, v in out.metrics.items()}
    scalars["diagnostics/time_s"] = time.perf_counter() - t0
    log_fn(scalars, 0)
    log.info("base policy: heterogeneity %.4f, anti-concentration %.3f (margin %g), success %.3f",
             out.metrics["heterogeneity"], out.metrics["anti_concentration"], d.margin, out.metrics["success"])
    return scalars


def train_sft_job(cfg: TrainConfig, run_dir: Path, wandb_group: str | None = None) -> dict:
    """``algo=sft``: warm-start the base policy as PPO would, log its diagnostics, then the
    verifier-free baseline of ``cfg.sft`` (metarl_llm.sft.run_vf): SFT on its own
    rejection-sampled or stitched trials and the held-out measurement. Writes the fitted
    policy to ``policy/``, ``vf_summary.json``, metrics.jsonl and summary.json."""
    from metarl_llm.sft import run_vf

    t_start = time.perf_counter()
    device = start_job(cfg, run_dir)
    policy, tokenizer, codec, make_env, ws_info = base_policy(cfg, device)
    if wandb_group and not cfg.logger.group:
        cfg.logger.group = wandb_group
    tracker = Tracker(cfg.logger, run_dir, OmegaConf.to_container(OmegaConf.structured(cfg)), run_dir.name)
    diag = base_diagnostics(cfg, policy, codec, make_env, tracker.log)
    policy, result = run_vf(policy, tokenizer, codec, make_env, heldout_env_maker(cfg), cfg.budget, cfg.sft, cfg.seed,
                            torch.Generator().manual_seed(cfg.seed), cfg.model.gradient_checkpointing, tracker.log)
    policy.save_pretrained(run_dir / "policy")
    tokenizer.save_pretrained(run_dir / "policy")
    (run_dir / "vf_summary.json").write_text(json.dumps(result, indent=2, sort_keys=True))
    summary = {"env": cfg.env.name, "algo": "sft", "seed": cfg.seed, **diag, **result,
               "warm_start_cached": bool(ws_info.get("warm_start/cached", False)),
               "policy_dir": str(run_dir / "policy"), "wall_time_s": time.perf_counter() - t_start}
    tracker.finish(summary)
    log.info("sft (%s): %d records, held-out success %.3f; maj@N %s", cfg.sft.data, result["sft/records"],
             result["heldout/success"], result["parallel"]["maj_at_n"])
    return summary
