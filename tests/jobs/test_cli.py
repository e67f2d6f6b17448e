"""The commands a user types: train.py as a single run and as a Hydra multirun sweep."""

import json
import os
import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException

from tests.support import ROOT

TINY = [
    "algo.iterations=1",
    "algo.problems_per_iter=2",
    "algo.group_size=2",
    "algo.minibatch_size=4",
    "warm_start.steps=2",
    "warm_start.focused_until_loss=0",
    "warm_start.num_traces=16",
    "warm_start.batch_size=8",
    "eval.num_problems=2",
    "eval.samples_per_problem=2",
    "eval.prover_samples=1",
    "eval.adaptation=false",
    "model.tiny.hidden_size=32",
    "model.tiny.num_layers=1",
    "model.tiny.num_heads=2",
    "model.tiny.intermediate_size=64",
    "logger.mode=disabled",
    "logger.progress_bar=false",
    "checkpoint_every=0",
    "eval.budget_scales=[1]",  # the final evaluation at the training budget only (the sweep is what is checked)
    "threads=1",  # a model this small gains nothing from two threads, and loses many times over on a busy core
]


def run(args, tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "1"}
    return subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            *args,
            f"warm_start.cache_dir={tmp_path / 'cache'}",
            f"hydra.run.dir={tmp_path / 'run'}",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_multirun_sweep_writes_one_directory_per_job(tmp_path):
    res = run(["-m", "bonus=none,info_gain", "seed=0,1", *TINY], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    summaries = sorted((tmp_path / "sweep").glob("*/summary.json"))
    got = {(json.loads(p.read_text())["bonus"], json.loads(p.read_text())["seed"]) for p in summaries}
    assert got == {("none", 0), ("none", 1), ("info_gain/sample", 0), ("info_gain/sample", 1)}


def test_bad_option_fails_at_start_naming_it(tmp_path, compose_cfg):
    # Composition errors, in process (the command line composes the same config):
    with pytest.raises(ConfigCompositionException, match="env/nope"):
        compose_cfg("env=nope")
    with pytest.raises(ConfigCompositionException, match="max_episodes"):
        compose_cfg("budget.max_episodes=three")
    # and one through train.py itself: nothing of the job runs and no run directory is written
    res = run(["model.critic=bogus"], tmp_path)  # a closed choice: Hydra's composition lists the values
    assert res.returncode != 0 and "expected one of [shared, separate]" in res.stderr and "model.critic" in res.stderr
    assert "trainer.py" not in res.stderr and not (tmp_path / "run" / "config.yaml").exists()  # before any job code ran
    assert not (tmp_path / "run" / "summary.json").exists()
