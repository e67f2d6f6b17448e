"""Budget-aware evaluation: curve, regret and token-efficiency functions against hand-computed
step curves; maj@k on hand-built trials; budget scaling; the command line on a real run."""

import json
import math
import os
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from metarl_llm import config as C
from metarl_llm.core.trial import Trial
from metarl_llm.evaluation.curves import (
    budget_label,
    budget_scales,
    cumulative_regret,
    curve_tokens,
    default_efficiency_level,
    maj_at_k,
    scale_budget,
    success_curve,
    token_efficiency_ratio,
    tokens_to_success,
    trial_breakpoints,
)
from metarl_llm.jobs.evaluate_run import _env_schema, compare_reports, load_run_config, parse_command_line
from tests.support import ROOT

# ------------------------------------------------------------------ curve


def test_success_curve_is_the_mean_of_per_trial_step_functions():
    a = (np.array([0, 3, 5]), np.array([0.5, 1.0, 1.0]))
    b = (np.array([0, 2, 2, 4]), np.array([0.0, 0.5, 0.25, 0.0]))  # two breakpoints at t=2: the last wins
    # t:      0    1    2     3     4    5    6
    # a:     .5   .5   .5    1     1    1    1
    # b:      0    0  .25   .25    0    0    0
    s = success_curve([a, b], 6)
    np.testing.assert_allclose(s, [0.25, 0.25, 0.375, 0.625, 0.5, 0.5, 0.5])
    assert s.shape == (7,)


def test_success_curve_before_the_first_breakpoint_and_beyond_the_budget():
    late = (np.array([2, 10]), np.array([1.0, 0.0]))  # 0 before t=2; the breakpoint at 10 lies past C=4
    np.testing.assert_allclose(success_curve([late], 4), [0, 0, 1, 1, 1])
    with pytest.raises(ValueError, match="non-decreasing"):
        success_curve([(np.array([3, 1]), np.array([0.0, 1.0]))], 4)
    with pytest.raises(ValueError, match="no trials"):
        success_curve([], 4)


def test_trial_breakpoints_count_policy_tokens_only():
    t = Trial(problem_id="p", group=0)
    t.append([1, 2, 3], False, -1)  # prompt: 3 tokens, not the policy's
    t.append([4, 5, 6, 7], True, 0)  # episode 0: 4 policy tokens
    t.append([8, 9], False, -1)  # observation: 2 tokens
    t.append([10, 11, 12], True, 1)  # episode 1 gives the final answer: 3 policy tokens
    t.answer_episode, t.outcome = 1, 1.0
    tokens, values = trial_breakpoints(t, np.array([0.25, 0.5]))  # J after the prompt, after episode 0
    assert tokens.tolist() == [0, 4, 7] and values.tolist() == [0.25, 0.5, 1.0]
    with pytest.raises(ValueError, match="boundaries"):
        trial_breakpoints(t, np.array([0.25]))


# ----------------------------------------------------------------- regret


def test_cumulative_regret_hand_computed():
    s = np.array([0.0, 0.5, 1.0, 1.0])  # C = 3: ((1-0) + (1-0.5) + (1-1)) / 3
    assert cumulative_regret(s) == pytest.approx(0.5)
    assert cumulative_regret(s, 2) == pytest.approx(0.75)  # ((1-0) + (1-0.5)) / 2
    assert cumulative_regret(np.ones(9)) == 0.0
    assert cumulative_regret(np.zeros(9)) == 1.0
    # the curve of the first test: (0.75 + 0.75 + 0.625 + 0.375 + 0.5 + 0.5) / 6
    assert cumulative_regret(np.array([0.25, 0.25, 0.375, 0.625, 0.5, 0.5, 0.5])) == pytest.approx(3.5 / 6)
    with pytest.raises(ValueError):
        cumulative_regret(np.array([0.5]))


# ------------------------------------------------------- token efficiency


def test_tokens_to_success():
    s = np.array([0.2, 0.5, 0.4, 0.9])
    assert tokens_to_success(s, 0.5) == 1
    assert tokens_to_success(s, 0.6) == 3
    assert tokens_to_success(s, 0.1) == 0
    assert tokens_to_success(s, 0.95) is None
    assert tokens_to_success(np.array([0.0, 0.1 + 0.2]), 0.3) == 1  # float rounding does not hide a hit


def test_token_efficiency_ratio():
    a = np.array([0.0, 0.5, 1.0, 1.0])
    b = np.array([0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 1.0])
    assert default_efficiency_level(a, b) == pytest.approx(0.9)
    assert token_efficiency_ratio(a, b) == pytest.approx(4 / 2)  # level 0.9: a at t=2, b at t=4
    assert token_efficiency_ratio(b, a) == pytest.approx(2 / 4)
    assert token_efficiency_ratio(a, b, level=0.5) == pytest.approx(3 / 1)
    assert default_efficiency_level(np.array([0.8]), np.array([0.0, 0.5])) == pytest.approx(0.45)
    assert token_efficiency_ratio(a, np.array([0.0, 0.4]), level=0.5) is None  # b never reaches it
    assert token_efficiency_ratio(a, np.zeros(3)) is None  # no success in b: level 0, nothing to reach
    assert token_efficiency_ratio(np.array([1.0, 1.0]), np.array([1.0, 1.0])) == 1.0
    assert token_efficiency_ratio(np.array([1.0, 1.0]), np.array([0.0, 1.0])) == math.inf


def test_compare_reports_per_budget():
    rep = lambda curves: {"budgets": {k: {"curve": list(v)} for k, v in curves.items()}}  # noqa: E731
    a = rep({"1": [0.0, 0.5, 1.0, 1.0], "2": [0.0, 1.0]})
    b = rep({"1": [0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 1.0], "4": [1.0]})
    out = compare_reports(a, b)
    assert out["token_efficiency_ratio"] == pytest.approx(2.0) and set(out["by_budget"]) == {"1"}
    assert out["by_budget"]["1"]["tokens_a"] == 2 and out["by_budget"]["1"]["tokens_b"] == 4


# ------------------------------------------------------------------ maj@k


class GoldGrader:
    def __init__(self, gold):
        self.gold = gold

    def score(self, answer):
        return float(answer == self.gold)


def _trial(group, answer, gold):
    return Trial(problem_id=f"p{group}", group=group, answer=answer, grader=GoldGrader(gold))


def test_maj_at_k_hand_built():
    trials = [
        _trial(0, "7", "7"),
        _trial(0, " 7 ", "7"),
        _trial(0, "3", "7"),  # "7" twice (stripped) -> right
        _trial(1, "3", "5"),
        _trial(1, "5", "5"),  # tie: first seen "3" -> wrong
        _trial(2, None, "1"),
        _trial(2, "", "1"),  # no vote -> 0
        _trial(3, "2", "4"),
        _trial(3, "4", "4"),
        _trial(3, "2", "4"),  # "2" wins although "4" is right
        _trial(4, "9", "9"),
    ]
    assert maj_at_k(trials) == pytest.approx(2 / 5)
    interleaved = [trials[3], trials[0], trials[4], trials[1], trials[2]]  # grouping by problem, not position
    assert maj_at_k(interleaved) == pytest.approx(1 / 2)


# ------------------------------------------------------------ extrapolation


def test_scale_budget():
    b = C.BudgetConfig(max_episodes=3, max_episode_tokens=32, max_total_tokens=96, answer_max_tokens=12)
    half, four = scale_budget(b, 0.5), scale_budget(b, 4)
    assert (half.max_episodes, half.max_total_tokens) == (2, 48)  # 1.5 rounds half up
    assert (four.max_episodes, four.max_total_tokens) == (12, 384)
    tiny = scale_budget(b, 0.1)
    assert (tiny.max_episodes, tiny.max_total_tokens) == (1, 32)  # at least 1 episode and one episode's tokens
    for s in (half, four, tiny):
        assert (s.max_episode_tokens, s.answer_max_tokens, s.max_prompt_tokens) == (32, 12, b.max_prompt_tokens)
    assert scale_budget(b, 1) == b
    assert curve_tokens(b) == 108 and curve_tokens(four) == 396
    with pytest.raises(ValueError, match="budget_scales"):
        scale_budget(b, 0)


def test_budget_scales_and_labels():
    assert budget_scales(C.EvalConfig()) == [0.5, 1.0, 2.0, 4.0]
    assert budget_scales(C.EvalConfig(budget_scales=[2.0, 0.5, 2.0])) == [0.5, 1.0, 2.0]  # 1 always, once each
    assert budget_scales(C.EvalConfig(extrapolation=False)) == [1.0]
    assert [budget_label(s) for s in (0.5, 1.0, 2, 4.0)] == ["0.5", "1", "2", "4"]


# ------------------------------------------------------------- command line


def test_parse_command_line():
    opts, overrides = parse_command_line(["run_dir=/tmp/some/run", "eval.num_problems=32", "checkpoint=iter_000060"])
    assert opts == {"run_dir": "/tmp/some/run", "checkpoint": "iter_000060", "compare": None}
    assert [o.key_or_group for o in overrides] == ["eval.num_problems"]
    with pytest.raises(ValueError, match="run_dir"):
        parse_command_line(["eval.num_problems=32"])


@pytest.mark.parametrize("schema", [C.PlantedSubseqEnvConfig, C.MathEnvConfig, C.ReasoningGymEnvConfig])
def test_saved_env_config_finds_its_schema(schema):
    assert _env_schema(OmegaConf.create(asdict(schema()))) is schema


TINY = [
    "env=planted_subseq",
    "algo.iterations=2",
    "algo.problems_per_iter=2",
    "algo.group_size=2",
    "algo.minibatch_size=4",
    "warm_start.steps=60",
    "warm_start.focused_until_loss=0",
    "warm_start.num_traces=256",
    "warm_start.batch_size=16",  # a few non-zero J values
    "eval.num_problems=3",
    "eval.samples_per_problem=2",
    "eval.prover_samples=2",
    "eval.every=0",
    "eval.budget_scales=[0.5,2]",
    "eval.adaptation_episodes=[1,2]",
    "model.tiny.hidden_size=32",
    "model.tiny.num_layers=1",
    "model.tiny.num_heads=2",
    "model.tiny.intermediate_size=64",
    "logger.mode=disabled",
    "logger.progress_bar=false",
    "checkpoint_every=1",
]
FIGURES = (
    "regret",
    "tokens_to_success",
    "tokens_to_success_level",
    "maj_at_k",
    "heldout_success_curve",
    "heldout_success_by_budget",
    "regret_by_budget",
    "heldout_tokens_per_trial_by_budget",
)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the runs below: a model this small gains nothing from two, and
    two threads on a core another process is using slow it down many times over."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield 1
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, one_thread):
    """A 2-iteration run of a tiny model (warm start cached in tmp), shared by the tests below."""
    from hydra import compose, initialize_config_dir

    from metarl_llm.runtime.setup import register_configs
    from metarl_llm.trainer import train

    tmp = tmp_path_factory.mktemp("evalrun")
    register_configs()
    with initialize_config_dir(version_base=None, config_dir=str(ROOT / "conf")):
        cfg = OmegaConf.to_object(compose("config", overrides=[*TINY, f"warm_start.cache_dir={tmp / 'cache'}"]))
    summary = train(cfg, tmp / "run")
    return tmp / "run", summary


def test_cli_reproduces_the_training_runs_final_figures(trained_run):
    run, summary = trained_run
    assert json.loads((run / "summary.json").read_text()) == summary
    assert set(summary["heldout_success_by_budget"]) == {"0.5", "1", "2"}
    assert summary["heldout_success_by_budget"]["1"] == summary["heldout_success_final"]
    written = json.loads((run / "eval_iter_000002.json").read_text())
    for _label, b in written["budgets"].items():  # at t = C every trial has its outcome
        assert b["curve"][-1] == pytest.approx(b["metrics"]["success"]) and len(b["curve"]) == b["budget_tokens"] + 1
    other = run.parent / "other"  # an evaluated run to compare with: this one's training-time evaluation
    (other / "checkpoints").mkdir(parents=True)
    (other / "checkpoints" / "latest").write_text("iter_000002")
    (run / "eval_iter_000002.json").rename(other / "eval_iter_000002.json")

    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    res = subprocess.run(
        [sys.executable, "-m", "metarl_llm.evaluate", f"run_dir={run}", f"compare={other}", "logger.mode=offline", "threads=1"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "regret" in res.stdout and "2x" in res.stdout
    report = json.loads((run / "eval_iter_000002.json").read_text())
    assert report["checkpoint"] == "iter_000002"
    for key in FIGURES:
        assert report["figures"][key] == summary[key], key
    assert report["figures"]["adaptation"] == summary["adaptation"]  # the in-context figures reproduce too
    assert report["budgets"] == written["budgets"]
    assert report["compare"]["by_budget"]["1"]["ratio"] in (1.0, None)  # the same figures: as efficient
    for png in ("success_vs_tokens_iter_000002.png", "budget_extrapolation_iter_000002.png"):
        assert (run / png).stat().st_size > 0
    assert list((run / "eval" / "iter_000002" / "wandb").glob("offline-run-*")), "offline W&B eval run missing"


def test_overrides_of_the_saved_config(trained_run):
    run, _ = trained_run
    cfg = load_run_config(run, ["eval.samples_per_problem=8", "budget.max_episodes=4", "eval.budget_scales=[1,2]"])
    assert isinstance(cfg, C.TrainConfig) and isinstance(cfg.env, C.PlantedSubseqEnvConfig)
    assert cfg.eval.samples_per_problem == 8 and cfg.budget.max_episodes == 4 and cfg.eval.budget_scales == [1.0, 2.0]
    assert cfg.model.tiny.hidden_size == 32  # the rest is the run's
    with pytest.raises(ValueError, match="eval.nope"):
        load_run_config(run, ["eval.nope=1"])
    with pytest.raises(ValueError, match="max_episodes"):
        load_run_config(run, ["budget.max_episodes=three"])


def test_missing_run_dir_or_checkpoint_is_named(trained_run, tmp_path, monkeypatch, capsys):
    from metarl_llm.jobs.evaluate_run import evaluate_run

    run, _ = trained_run
    with pytest.raises(FileNotFoundError, match="iter_000099"):
        evaluate_run(run, "iter_000099")
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        evaluate_run(tmp_path)
    # the command (`python -m metarl_llm.evaluate`, its entry point in process): one line, exit status 2
    from metarl_llm.evaluate import cli

    missing = tmp_path / "no_such_run"
    monkeypatch.setattr(sys, "argv", ["metarl_llm.evaluate", f"run_dir={missing}"])
    with pytest.raises(SystemExit) as exit_:
        cli()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: ") and str(missing) in err and err.count("\n") == 1
