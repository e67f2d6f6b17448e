"""Exact resume and crash-safe checkpoints.

A run that crashes mid-way and is resumed with ``resume=auto`` logs the same
per-iteration metrics as an uninterrupted run (timings aside); a partial or corrupted
checkpoint is never resumed from; ``checkpoint_keep`` bounds the checkpoints kept.
"""

import json
import shutil

import pytest

import metarl_llm.trainer as trainer_mod
from metarl_llm.checkpoint import COMPLETE, complete_checkpoints, find_checkpoint
from metarl_llm.trainer import train

SMALL = [
    "algo.iterations=5", "algo.problems_per_iter=2", "algo.group_size=2", "algo.minibatch_size=2",
    "warm_start.steps=0",
    "eval.num_problems=2", "eval.samples_per_problem=2", "eval.prover_samples=2", "eval.every=2",
    "eval.extrapolation=false", "checkpoint_every=2", "logger.progress_bar=false", "threads=1",
    "algo.ent_coef=0.05",  # no warm start: the entropy term gives every update a real gradient
]


def train_rows(run):
    """Per-iteration metrics without wall-clock timings."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("perf/") and k != "warm_start/cached"} for r in rows]


class Crash(RuntimeError):
    pass


@pytest.mark.parametrize("bonus", ["info_gain"])  # the bonus's meta-prover draws from the run's generator too
def test_crash_then_resume_gives_the_uninterrupted_run(compose_cfg, tmp_path, monkeypatch, bonus):
    cfg = compose_cfg(f"bonus={bonus}", *SMALL, f"warm_start.cache_dir={tmp_path / 'cache'}")
    full = train(cfg, tmp_path / "full")

    # The same run, crashing in the update of iteration 4 (after the checkpoint of iteration 2
    # and the evaluation of iteration 2, with iteration 3 already logged).
    real_update = trainer_mod.ppo_update
    calls = {"n": 0}

    def crashing_update(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise Crash("killed")
        return real_update(*args, **kwargs)

    monkeypatch.setattr(trainer_mod, "ppo_update", crashing_update)
    cfg_b = compose_cfg(f"bonus={bonus}", *SMALL, f"warm_start.cache_dir={tmp_path / 'cache'}")
    with pytest.raises(Crash):
        train(cfg_b, tmp_path / "resumed")
    assert [r["iteration"] for r in train_rows(tmp_path / "resumed") if "train/outcome" in r] == [1, 2, 3]
    monkeypatch.setattr(trainer_mod, "ppo_update", real_update)

    cfg_c = compose_cfg(f"bonus={bonus}", *SMALL, f"warm_start.cache_dir={tmp_path / 'cache'}", "resume=auto")
    resumed = train(cfg_c, tmp_path / "resumed")
    assert train_rows(tmp_path / "resumed") == train_rows(tmp_path / "full")  # iteration 3 logged once, identically
    for key in ("heldout_success_final", "heldout_success_start", "regret", "heldout_tokens_per_trial"):
        assert resumed[key] == full[key], key


def test_resume_from_a_path_continues_in_that_run(compose_cfg, tmp_path):
    cfg = compose_cfg(*SMALL, "algo.iterations=2", "checkpoint_every=1", f"warm_start.cache_dir={tmp_path / 'cache'}")
    train(cfg, tmp_path / "run")
    longer = compose_cfg(*SMALL, "algo.iterations=3", "checkpoint_every=1", f"warm_start.cache_dir={tmp_path / 'cache'}",
                         f"resume={tmp_path / 'run' / 'checkpoints' / 'iter_000002'}")
    train(longer, tmp_path / "elsewhere")
    assert not (tmp_path / "elsewhere").exists()
    assert [r["iteration"] for r in train_rows(tmp_path / "run") if "train/outcome" in r] == [1, 2, 3]
    with pytest.raises(ValueError, match="no complete checkpoint"):
        train(compose_cfg(*SMALL, f"resume={tmp_path / 'empty'}"), tmp_path / "x")


def test_partial_and_corrupted_checkpoints_are_ignored(compose_cfg, tmp_path):
    cfg = compose_cfg(*SMALL, "algo.iterations=3", "checkpoint_every=1", "checkpoint_keep=0",
                      f"warm_start.cache_dir={tmp_path / 'cache'}")
    train(cfg, tmp_path / "run")
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in complete_checkpoints(root)] == ["iter_000001", "iter_000002", "iter_000003"]
    # A save killed before its rename: a temporary directory, never resumed from.
    shutil.copytree(root / "iter_000003", root / ".tmp_iter_000004")
    # The newest checkpoint corrupted: marker gone, trainer state truncated.
    (root / "iter_000003" / COMPLETE).unlink()
    assert find_checkpoint(tmp_path / "run") == root / "iter_000002"  # `latest` names iter_000003: skipped
    (root / "iter_000002" / "trainer_state.pt").unlink()
    assert find_checkpoint(tmp_path / "run") == root / "iter_000001"
    with pytest.raises(ValueError, match="incomplete"):
        find_checkpoint(root / "iter_000003")


def test_checkpoint_keep_bounds_the_checkpoints(compose_cfg, tmp_path):
    cfg = compose_cfg(*SMALL, "algo.iterations=4", "checkpoint_every=1", "checkpoint_keep=2",
                      f"warm_start.cache_dir={tmp_path / 'cache'}")
    train(cfg, tmp_path / "run")
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["iter_000003", "iter_000004", "latest"]
    assert (root / "latest").read_text() == "iter_000004"
