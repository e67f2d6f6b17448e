"""Every option of every config group composes; bad options fail at start with a clear message."""


import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException

from metarl_llm import config as C
from tests.support import ROOT

CONF = ROOT / "conf"
GROUPS = ["env", "budget", "model", "algo", "bonus", "logger"]
SCHEMA = {
    "env": C.EnvConfig, "budget": C.BudgetConfig, "model": C.ModelConfig,
    "algo": C.AlgoConfig, "bonus": C.BonusConfig, "logger": C.LoggerConfig,
}


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes(compose_cfg, group, option):
    cfg = compose_cfg(f"{group}={option}")
    node = getattr(cfg, group)
    assert isinstance(node, SCHEMA[group])
    assert isinstance(cfg, C.TrainConfig)


def test_defaults_are_the_documented_main_job(compose_cfg):
    cfg = compose_cfg()
    assert cfg.env.name == "planted_subseq" and cfg.bonus.name == "none" and cfg.model.name_or_path is None
    assert cfg.logger.mode == "offline"


def test_card_command_composes(compose_cfg):
    cfg = compose_cfg("env=math", "bonus=info_gain")
    assert isinstance(cfg.env, C.MathEnvConfig) and cfg.bonus.name == "info_gain" and cfg.bonus.estimator == "sample"


@pytest.mark.parametrize(
    "override,exc,words",
    [
        ("env=nope", MissingConfigException, "env/nope"),
        ("bonus=nope", MissingConfigException, "bonus/nope"),
        ("algo.lr=fast", ConfigCompositionException, "algo.lr"),
        ("budget.max_episodes=1.5", ConfigCompositionException, "budget.max_episodes"),
        ("algo.lrr=1", ConfigCompositionException, "algo.lrr"),
        ("env.task=countdown", ConfigCompositionException, "env.task"),  # planted has no task
    ],
)
def test_bad_options_fail_at_compose(compose_cfg, override, exc, words):
    with pytest.raises(exc) as e:
        compose_cfg(override)
    assert words in str(e.value)


def test_bad_values_fail_before_training(compose_cfg, tmp_path):
    from metarl_llm.jobs.common import validate

    for override, words in [
        ("algo.advantage=vtrace", "algo.advantage"),
        ("algo.policy_loss=dpo", "algo.policy_loss"),
        ("bonus.name=curiosity", "bonus.name"),
        ("bonus.credit=later", "bonus.credit"),
        ("env.id=metarl/Nope-v0", "env.id"),
        ("warm_start.replay_fraction=1.5", "warm_start.replay_fraction"),
        ("warm_start.focused_fraction=-0.1", "warm_start.focused_fraction"),
    ]:
        with pytest.raises(ValueError, match=words.replace(".", r"\.")):
            validate(compose_cfg(override))
