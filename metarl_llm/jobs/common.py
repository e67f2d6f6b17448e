"""What every job shares: validation (the rules across groups and the registry names, after
each group's own: :meth:`TrainConfig.validate`), resume and finished-run checks, the start
of a job (threads, seeds, config.yaml), the warm-started base policy and the base-policy
diagnostics.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import gymnasium as gym
import torch

import envs  # noqa: F401  (registers the environments)
from metarl_llm.config import BudgetConfig, TrainConfig
from metarl_llm.core.chat import ChatFormat
from metarl_llm.core.segment import SEGMENTERS
from metarl_llm.core.trial import StreamCodec
from metarl_llm.evaluation.diagnostics import policy_diagnostics
from metarl_llm.models import (
    enable_gradient_checkpointing,
    load_policy,
)
from metarl_llm.rl.advantages import get_advantage
from metarl_llm.rl.bonus import check_verifier_name, get_estimator
from metarl_llm.rl.losses import get_policy_loss
from metarl_llm.rollout.engine import engine_from_config
from metarl_llm.runtime.checkpoint import (
    find_checkpoint,
)
from metarl_llm.runtime.setup import env_factory, quiet_libraries, resolve_device, seed_everything
from metarl_llm.runtime.tracking import Tracker, read_summary
from metarl_llm.sft.warm_start import fitted_budget, warm_start
from metarl_llm.verify.model import is_saved_verifier

log = logging.getLogger(__name__)

FITTED_LIMITS = ("max_episode_tokens", "max_total_tokens", "max_prompt_tokens", "answer_max_tokens")  # budget.fit_traces


def validate(cfg: TrainConfig) -> None:
    """Fail at start, naming the option: every group's own rules (:meth:`TrainConfig.validate`),
    then the registry names (open choices: code can register more) and the rules across groups."""
    cfg.validate()
    # registry names
    get_advantage(cfg.algo.advantage)
    get_policy_loss(cfg.algo.policy_loss)
    if cfg.bonus.name != "none" or cfg.algo.advantage == "termination":  # both estimate J
        get_estimator(cfg.bonus.estimator)
        if cfg.bonus.estimator == "verifier":
            check_verifier_name(cfg.bonus.verifier)
    if cfg.env.id not in gym.registry:
        raise ValueError(
            f"env.id={cfg.env.id!r} is not a registered environment; known: {sorted(k for k in gym.registry if k.startswith('metarl/'))}"
        )
    engine_from_config(cfg.rollout)
    SEGMENTERS.lookup(cfg.segment.name)
    # rules across groups
    if cfg.segment.after and cfg.env.feedback:
        raise ValueError(
            f"segment={cfg.segment.name} cuts episodes after a trial is generated, so the environment cannot reply "
            "between them: env.feedback=true needs segment=delimiter (generation stops at each episode end)"
        )
    if cfg.algo.old_logprobs == "sampled" and (cfg.model.dtype != "float32" or cfg.model.autocast == "bf16"):
        raise ValueError(
            f"algo.old_logprobs=sampled takes the PPO ratio's old log-probs from the sampling passes, which match a "
            f"recomputation only in float32: it needs model.dtype=float32 and model.autocast off (got model.dtype="
            f"{cfg.model.dtype}, model.autocast={cfg.model.autocast}); or use algo.old_logprobs=recompute"
        )
    if cfg.adapt.name == "ttt" and cfg.env.name != "arc":
        raise ValueError(f"adapt=ttt fits each problem's demonstrations: it needs env=arc, got env={cfg.env.name}")
    if cfg.reward.name == "verifier":
        if not cfg.reward.verifier or not is_saved_verifier(Path(cfg.reward.verifier).expanduser()):
            raise ValueError(f"reward=verifier needs reward.verifier=<a saved verifier directory>, got {cfg.reward.verifier!r}")


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
        cfg.algo.iterations,
        cfg.seed,
        cfg.env.name,
    ):
        return None
    log.info("resume=%s: the run in %s is already complete (summary.json); nothing to do", cfg.resume, target)
    return summary


def stream_codec(cfg: TrainConfig, tokenizer) -> StreamCodec:
    """The run's codec: episodes cut by the ``segment`` rule, the model's forced-answer text (else the
    environment's), and prompts rendered through the tokenizer's chat template when it has one and
    ``model.chat_template`` is on."""
    chat = None
    if cfg.model.chat_template and getattr(tokenizer, "chat_template", None):
        chat = ChatFormat(tokenizer, cfg.model.system_prompt, name=cfg.model.name_or_path or "the tokenizer")
    elif cfg.model.system_prompt is not None:
        raise ValueError(
            f"model.system_prompt needs a chat template: {cfg.model.name_or_path or 'the tiny model'}'s tokenizer "
            f"has none{'' if cfg.model.chat_template else ' in use (model.chat_template=false)'}"
        )
    forced = cfg.model.forced_answer_text if cfg.model.forced_answer_text is not None else cfg.env.forced_answer_text
    return StreamCodec(tokenizer, cfg.segment.delimiter, forced, chat, cfg.segment, cfg.budget.max_episodes)


def warm_start_budget(cfg: TrainConfig) -> BudgetConfig:
    """The budget the warm start's expert traces are drawn and checked under: the run's, with
    ``warm_start.max_episodes`` episodes where that is set."""
    if cfg.warm_start.max_episodes is None or cfg.warm_start.max_episodes == cfg.budget.max_episodes:
        return cfg.budget
    if cfg.segment.after:  # the codec's segmenter caps a trial at the run's budget.max_episodes
        raise ValueError(
            f"warm_start.max_episodes={cfg.warm_start.max_episodes} differs from budget.max_episodes="
            f"{cfg.budget.max_episodes}, and segment={cfg.segment.name} cuts episodes after generation up to the "
            "run's budget: drop warm_start.max_episodes, or use segment=delimiter"
        )
    return replace(cfg.budget, max_episodes=cfg.warm_start.max_episodes)


def fitted_budgets(cfg: TrainConfig, codec: StreamCodec, seed: int) -> tuple[BudgetConfig, BudgetConfig]:
    """(the run's budget, the warm start's: :func:`warm_start_budget`). With ``budget.fit_traces``
    the token limits of both are raised to what the warm start's traces (seed ``seed``) need; the
    run keeps its ``max_episodes``."""
    ws_budget = warm_start_budget(cfg)
    if not cfg.budget.fit_traces:
        return cfg.budget, ws_budget
    limits = fitted_budget(env_factory(replace(cfg, budget=ws_budget)), codec, ws_budget, cfg.warm_start, seed)
    return replace(limits, max_episodes=cfg.budget.max_episodes), limits


def base_policy(cfg: TrainConfig, device: torch.device):
    """The policy a job starts from: loaded (``model``) and warm-started (``warm_start``,
    seeded ``warm_start.seed`` or the run's seed). Returns (policy, tokenizer, codec,
    env_factory, warm-start info)."""
    ws_seed = cfg.seed if cfg.warm_start.seed is None else cfg.warm_start.seed
    policy, tokenizer = load_policy(cfg.model, ws_seed)
    codec = stream_codec(cfg, tokenizer)
    make_env = env_factory(cfg)
    fitted = {}
    run_budget, ws_budget = fitted_budgets(cfg, codec, ws_seed)
    if cfg.budget.fit_traces:  # the run's budget from here on: what the data needs
        cfg.budget = run_budget
        fitted = {f"budget/{k}": getattr(cfg.budget, k) for k in FITTED_LIMITS}
        log.info("budget.fit_traces: %s", " ".join(f"budget.{k}={getattr(cfg.budget, k)}" for k in FITTED_LIMITS))
    # The cache key leaves out what concerns PPO only (LoRA, autocast, the attention backend).
    t0 = time.perf_counter()
    policy, ws_info = warm_start(
        policy,
        tokenizer,
        codec,
        env_factory(replace(cfg, budget=ws_budget)),
        cfg.model,
        cfg.env,
        ws_budget,
        cfg.warm_start,
        ws_seed,
    )
    ws_info["perf/warm_start_s"] = time.perf_counter() - t0  # trained, or loaded from the cache
    if cfg.model.gradient_checkpointing:  # the warm start hands back a freshly loaded model
        enable_gradient_checkpointing(policy)
    return policy.to(device), tokenizer, codec, make_env, {**ws_info, **fitted}


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
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
    return resolve_device(cfg.device)


def base_diagnostics(cfg: TrainConfig, policy, codec: StreamCodec, make_env, log_fn) -> dict:
    """Heterogeneity and anti-concentration of the base policy on held-out problems
    (metarl_llm.evaluation.diagnostics, settings ``cfg.diagnostics``), logged as ``diagnostics/...``
    at step 0. Returns those scalars ({} when disabled)."""

    d = cfg.diagnostics
    if not d.enabled:
        return {}
    t0 = time.perf_counter()
    size = make_env("test").unwrapped.num_problems
    num = min(d.num_problems, size) if size is not None else d.num_problems
    pool = [make_env("test") for _ in range(num * d.num_continuations)]
    out = policy_diagnostics(
        policy,
        codec,
        pool,
        cfg.budget,
        num,
        d.num_continuations,
        d.num_rollouts,
        d.margin,
        torch.Generator().manual_seed(cfg.seed),
        engine_from_config(cfg.rollout),
    )
    scalars = {f"diagnostics/{k}": v for k, v in out.metrics.items()}
    scalars["diagnostics/time_s"] = time.perf_counter() - t0
    log_fn(scalars, 0)
    log.info(
        "base policy: heterogeneity %.4f, anti-concentration %.3f (margin %g), success %.3f",
        out.metrics["heterogeneity"],
        out.metrics["anti_concentration"],
        d.margin,
        out.metrics["success"],
    )
    return scalars


def job_tracker(cfg: TrainConfig, run_dir: Path, wandb_group: str | None = None, **resume) -> Tracker:
    """The job's metrics.jsonl and W&B run in ``run_dir``, its config as the run's config;
    ``wandb_group`` (a sweep's directory) is the W&B group unless ``logger.group`` names one.
    ``resume``: :class:`~metarl_llm.runtime.tracking.Tracker`'s ``resume_step``, ``run_id``, ``resume_rows``."""
    if wandb_group and not cfg.logger.group:
        cfg.logger.group = wandb_group  # the runs of one sweep share a W&B group
    return Tracker(cfg.logger, run_dir, cfg.to_container(), run_dir.name, **resume)
