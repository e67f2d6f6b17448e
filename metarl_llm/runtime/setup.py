"""Job set-up: the Hydra schemas (:func:`register_configs`, :func:`compose_config`), environment
factories from the env config and budget (:func:`env_factory`, :func:`heldout_env_maker`), the
device, seeds and library log levels.
"""

from __future__ import annotations

import logging
import random
from dataclasses import asdict, replace
from enum import Enum
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
import transformers
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

import envs  # noqa: F401  (registers the environments)
from envs.base import FailureGuard
from metarl_llm.config import (
    AdaptConfig,
    AlgoConfig,
    ArcEnvConfig,
    BonusConfig,
    BudgetConfig,
    InverseEnvConfig,
    LoggerConfig,
    MathEnvConfig,
    ModelConfig,
    PlantedSubseqEnvConfig,
    ReasoningGymEnvConfig,
    RewardConfig,
    SegmentConfig,
    TrainConfig,
)
from metarl_llm.runtime.distributed import run_time

log = logging.getLogger(__name__)


def env_kwargs(cfg: TrainConfig) -> dict:
    """``gymnasium.make`` keyword arguments from the env config and the budget."""
    # closed choices (env.source of env=arc) as plain strings: the environments know no Enum types
    kw = {k: str(v) if isinstance(v, Enum) else v for k, v in asdict(cfg.env).items() if k not in ("name", "id")}
    kw["max_episodes"] = cfg.budget.max_episodes
    # The model's answer format where it sets one (model.answer_marker, model.forced_answer_text).
    if cfg.model.answer_marker is not None:
        kw["answer_marker"] = cfg.model.answer_marker
    if cfg.model.forced_answer_text is not None:
        kw["forced_answer_text"] = cfg.model.forced_answer_text
    if cfg.segment.delimiter != "\n":  # the default is every environment's own
        kw["episode_delimiter"] = cfg.segment.delimiter
    return kw


def env_factory(cfg: TrainConfig):
    kw = env_kwargs(cfg)
    return lambda split: gym.make(cfg.env.id, split=split, **kw)


def heldout_env_maker(cfg: TrainConfig):
    """``budget -> held-out environment`` whose ``max_episodes`` follows that budget
    (the final evaluation runs at several budgets)."""
    return lambda budget: FailureGuard(env_factory(replace(cfg, budget=budget))("test"))  # grader failures are loud


def quiet_libraries() -> None:
    """Silence the libraries' own progress bars (dataset maps, shard writes); ours stays."""
    import datasets  # deferred: start-up cost (datasets loads only when it is needed)

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
    return torch.device(str(name))  # a plain string (name may be a Device)


def register_configs() -> None:
    """Register the schemas; conf/<group>/<option>.yaml extend them by name."""

    # ${run_time:FMT} (conf/config.yaml's run directory): the launch time, the same in every
    # process of an `accelerate launch`, so that all processes resolve one run directory.
    if not OmegaConf.has_resolver("run_time"):
        OmegaConf.register_new_resolver("run_time", run_time)
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(group="env", name="planted_subseq_schema", node=PlantedSubseqEnvConfig)
    cs.store(group="env", name="math_schema", node=MathEnvConfig)
    cs.store(group="env", name="inverse_schema", node=InverseEnvConfig)
    cs.store(group="env", name="reasoning_gym_schema", node=ReasoningGymEnvConfig)
    cs.store(group="env", name="arc_schema", node=ArcEnvConfig)
    cs.store(group="budget", name="budget_schema", node=BudgetConfig)
    cs.store(group="segment", name="segment_schema", node=SegmentConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="algo", name="algo_schema", node=AlgoConfig)
    cs.store(group="bonus", name="bonus_schema", node=BonusConfig)
    cs.store(group="logger", name="logger_schema", node=LoggerConfig)
    cs.store(group="reward", name="reward_schema", node=RewardConfig)
    cs.store(group="adapt", name="adapt_schema", node=AdaptConfig)


CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
"""The project's Hydra config directory (conf/ beside the package: a source checkout)."""


def compose_config(overrides=(), to_object: bool = True, config_dir: str = CONF_DIR):
    """The config ``train.py`` would run with these Hydra overrides, outside a Hydra app
    (benchmarks, tests): a :class:`TrainConfig` (``to_object``) or the DictConfig."""

    register_configs()
    with initialize_config_dir(version_base=None, config_dir=config_dir):
        cfg = compose("config", overrides=list(overrides))
    return OmegaConf.to_object(cfg) if to_object else cfg
