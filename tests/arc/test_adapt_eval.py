"""Per-problem adaptation in held-out evaluation (adapt=ttt): the hook is called once per
problem with that problem's environment, TTT runs end to end through train.py on ARC,
and adapt=ttt is refused where problems have no demonstrations."""

import json

import gymnasium as gym
import pytest

import envs  # noqa: F401
from metarl_llm.config import BudgetConfig, EvalConfig, TinyModelConfig
from metarl_llm.core.trial import StreamCodec
from metarl_llm.evaluation.heldout import eval_generator, evaluate
from metarl_llm.models import build_char_tokenizer, build_tiny_model
from tests.support import ROOT

TINY = [
    "model.tiny.hidden_size=32",
    "model.tiny.num_layers=1",
    "model.tiny.num_heads=2",
    "model.tiny.intermediate_size=64",
    "logger.mode=disabled",
    "logger.progress_bar=false",
    "threads=1",
]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def cfg_of(*overrides):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from metarl_llm.runtime.setup import register_configs

    register_configs()
    with initialize_config_dir(version_base=None, config_dir=str(ROOT / "conf")):
        return OmegaConf.to_object(compose("config", overrides=[*TINY, *overrides]))


def test_evaluate_adapts_once_per_problem_on_that_problem():
    tok = build_char_tokenizer()
    model = build_tiny_model(
        TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), len(tok), tok.pad_token_id, 0
    )
    codec = StreamCodec(tok, "\n", "Answer:")
    budget = BudgetConfig()
    cfg = EvalConfig(num_problems=3, samples_per_problem=2, prover_samples=2)
    env_list = [gym.make("metarl/Arc-v0", split="test", max_episodes=budget.max_episodes) for _ in range(6)]
    seen = []

    def adapt(env):
        seen.append(env.task.task_id)
        return model

    res = evaluate(model, codec, env_list, budget, cfg, eval_generator(0), adapt)
    assert len(seen) == 3
    assert [t.problem_id for t in res.trials[::2]] == seen  # each problem's trials follow its own adaptation
    assert [t.problem_id for t in res.trials[1::2]] == seen


def test_train_with_adapt_ttt_on_arc(tmp_path):
    from metarl_llm.trainer import train

    cfg = cfg_of(
        "env=arc",
        "adapt=ttt",
        "adapt.ttt.max_tasks=4",
        "adapt.ttt.epochs=1",
        "adapt.ttt.num_augmentations=1",
        "warm_start.steps=2",
        "warm_start.focused_until_loss=0",
        "warm_start.num_traces=16",
        "warm_start.batch_size=8",
        f"warm_start.cache_dir={tmp_path / 'c'}",
        "algo.iterations=1",
        "algo.problems_per_iter=2",
        "algo.group_size=2",
        "algo.minibatch_size=4",
        "eval.num_problems=2",
        "eval.samples_per_problem=1",
        "eval.prover_samples=2",
        "eval.extrapolation=false",
        "checkpoint_every=0",
    )
    summary = train(cfg, tmp_path / "run")
    assert summary["env"] == "arc" and 0.0 <= summary["heldout_success_final"] <= 1.0
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "name: ttt" in saved
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("heldout/success" in r for r in rows)


def test_adapt_ttt_needs_an_arc_environment():
    from metarl_llm.jobs.common import validate

    with pytest.raises(ValueError, match="adapt=ttt"):
        validate(cfg_of("env=planted_subseq", "adapt=ttt"))
    with pytest.raises(ValueError, match="ttt.r"):
        validate(cfg_of("env=arc", "adapt=ttt", "adapt.ttt.r=0"))
