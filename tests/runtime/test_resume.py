"""Exact resume and crash-safe checkpoints.

A run that crashes mid-way and is resumed with ``resume=auto`` logs the same
per-iteration metrics as an uninterrupted run (timings aside); a partial or corrupted
checkpoint is never resumed from; ``checkpoint_keep`` bounds the checkpoints kept.
"""

import json
import shutil

import pytest

from metarl_llm.jobs.ppo import PPOJob
from metarl_llm.runtime.checkpoint import COMPLETE, complete_checkpoints, find_checkpoint
from metarl_llm.trainer import train

SMALL = [
    "algo.iterations=5",
    "algo.problems_per_iter=2",
    "algo.group_size=2",
    "algo.minibatch_size=2",
    "warm_start.steps=0",
    "eval.num_problems=2",
    "eval.samples_per_problem=2",
    "eval.prover_samples=2",
    "eval.every=2",
    "eval.extrapolation=false",
    "eval.adaptation_episodes=[1,2]",  # the adaptation figures at two budgets: the path, not its size
    "checkpoint_every=2",
    "logger.progress_bar=false",
    "threads=1",
    "algo.ent_coef=0.05",  # no warm start: the entropy term gives every update a real gradient
    # A small model: what is checked (bit-exact resume, checkpoint files) does not depend on its size.
    "model.tiny.hidden_size=32",
    "model.tiny.num_layers=1",
    "model.tiny.num_heads=2",
    "model.tiny.intermediate_size=64",
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
    real_update = PPOJob.update
    calls = {"n": 0}

    def crashing_update(self, it, batch):
        calls["n"] += 1
        if calls["n"] == 4:
            raise Crash("killed")
        return real_update(self, it, batch)

    monkeypatch.setattr(PPOJob, "update", crashing_update)  # the update stage of iteration 4
    cfg_b = compose_cfg(f"bonus={bonus}", *SMALL, f"warm_start.cache_dir={tmp_path / 'cache'}")
    with pytest.raises(Crash):
        train(cfg_b, tmp_path / "resumed")
    assert [r["iteration"] for r in train_rows(tmp_path / "resumed") if "train/outcome" in r] == [1, 2, 3]
    monkeypatch.setattr(PPOJob, "update", real_update)

    cfg_c = compose_cfg(f"bonus={bonus}", *SMALL, f"warm_start.cache_dir={tmp_path / 'cache'}", "resume=auto")
    resumed = train(cfg_c, tmp_path / "resumed")
    assert train_rows(tmp_path / "resumed") == train_rows(tmp_path / "full")  # iteration 3 logged once, identically
    for key in ("heldout_success_final", "heldout_success_start", "regret", "heldout_tokens_per_trial"):
        assert resumed[key] == full[key], key


def test_resume_from_a_path_continues_in_that_run(compose_cfg, tmp_path):
    cfg = compose_cfg(*SMALL, "algo.iterations=2", "checkpoint_every=1", f"warm_start.cache_dir={tmp_path / 'cache'}")
    train(cfg, tmp_path / "run")
    longer = compose_cfg(
        *SMALL,
        "algo.iterations=3",
        "checkpoint_every=1",
        f"warm_start.cache_dir={tmp_path / 'cache'}",
        f"resume={tmp_path / 'run' / 'checkpoints' / 'iter_000002'}",
    )
    train(longer, tmp_path / "elsewhere")
    assert not (tmp_path / "elsewhere").exists()
    assert [r["iteration"] for r in train_rows(tmp_path / "run") if "train/outcome" in r] == [1, 2, 3]
    with pytest.raises(ValueError, match="no complete checkpoint"):
        train(compose_cfg(*SMALL, f"resume={tmp_path / 'empty'}"), tmp_path / "x")


def test_partial_and_corrupted_checkpoints_are_ignored(compose_cfg, tmp_path):
    cfg = compose_cfg(
        *SMALL, "algo.iterations=3", "checkpoint_every=1", "checkpoint_keep=0", f"warm_start.cache_dir={tmp_path / 'cache'}"
    )
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
    cfg = compose_cfg(
        *SMALL, "algo.iterations=4", "checkpoint_every=1", "checkpoint_keep=2", f"warm_start.cache_dir={tmp_path / 'cache'}"
    )
    train(cfg, tmp_path / "run")
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["iter_000003", "iter_000004", "latest"]
    assert (root / "latest").read_text() == "iter_000004"


def test_tracker_keeps_exactly_the_rows_logged_before_the_checkpoint(tmp_path):
    from metarl_llm.config import LoggerConfig
    from metarl_llm.runtime.tracking import Tracker, read_summary

    off = LoggerConfig(mode="disabled")
    t = Tracker(off, tmp_path, {}, "run")
    t.log({"train/outcome": 1.0}, step=1)
    t.log({"heldout/success": 0.5}, step=1)
    saved = t.rows  # a checkpoint of iteration 1 saved here
    t.log({"heldout/success": 0.25, "heldout_budget/1x/success": 0.25}, step=1)  # after it, at its own step
    t.log({"train/outcome": 0.0}, step=2)
    t._jsonl.write('{"iteration": 2, "heldout/succ')  # a row cut by the kill
    t._jsonl.close()
    assert saved == 2
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    resumed = Tracker(off, tmp_path, {}, "run", resume_step=1, resume_rows=saved)
    assert resumed.rows == 2 and (tmp_path / "metrics.jsonl").read_text().splitlines() == lines[:2]
    resumed._jsonl.close()
    # A checkpoint without metrics_rows (written before it existed): rows up to its step are kept.
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    legacy = Tracker(off, tmp_path, {}, "run", resume_step=1)
    assert legacy.rows == 3 and (tmp_path / "metrics.jsonl").read_text().splitlines() == lines[:3]
    legacy.finish({"iterations": 2})
    assert read_summary(tmp_path) == {"iterations": 2} and not list(tmp_path.glob("*.tmp"))
    (tmp_path / "summary.json").write_text('{"iterations": ')  # cut while being written
    assert read_summary(tmp_path) is None


TIMING_KEYS = ("wall_time_s", "final_eval_s", "rollout_tokens_per_s", "update_tokens_per_s", "warm_start_cached", "warm_start_s")
# Iteration 3 is the last: checkpoint 2 (after the held-out evaluation of iteration 2), then the
# final checkpoint 3 and, after it, the final evaluation's rows, logged at step 3.
END = [*SMALL, "algo.iterations=3"]


def untimed(summary):
    return {k: v for k, v in summary.items() if k not in TIMING_KEYS}


def test_kill_during_the_final_evaluation_then_resume(compose_cfg, tmp_path, monkeypatch):
    import metarl_llm.evaluation.report as report  # the final evaluation's plots (heldout calls them through it)

    cache = f"warm_start.cache_dir={tmp_path / 'cache'}"
    full = train(compose_cfg(*END, cache), tmp_path / "full")

    # Killed in the final evaluation, after its held-out rows (step 3, the final checkpoint's own
    # iteration) reached metrics.jsonl: evaluate_and_report plots right after logging them.
    def killed(*args, **kwargs):
        raise Crash("killed in the final evaluation")

    monkeypatch.setattr(report, "plot_success_curves", killed)
    with pytest.raises(Crash):
        train(compose_cfg(*END, cache), tmp_path / "resumed")
    rows = train_rows(tmp_path / "resumed")
    assert any(r["iteration"] == 3 and "heldout_budget/1x/success" in r for r in rows)  # the final rows were logged
    assert find_checkpoint(tmp_path / "resumed").name == "iter_000003"
    assert not (tmp_path / "resumed" / "summary.json").exists()
    monkeypatch.undo()

    resumed = train(compose_cfg(*END, cache, "resume=auto"), tmp_path / "resumed")
    assert train_rows(tmp_path / "resumed") == train_rows(tmp_path / "full")  # the final rows once, as uninterrupted
    assert untimed(resumed) == untimed(full)
    assert untimed(json.loads((tmp_path / "resumed" / "summary.json").read_text())) == untimed(full)


def test_kill_after_the_summary_does_not_redo_the_run(compose_cfg, tmp_path, monkeypatch):
    cache = f"warm_start.cache_dir={tmp_path / 'cache'}"
    run = tmp_path / "run"
    full = train(compose_cfg(*END, cache), run)
    metrics, summary = (run / "metrics.jsonl").read_bytes(), (run / "summary.json").read_bytes()
    rows = train_rows(run)

    # Killed after summary.json was written, before the process exited: resume=auto finds the
    # run finished and returns its summary without loading a model or logging anything.
    def nothing_may_run(*args, **kwargs):
        raise AssertionError("a finished run was redone")

    with monkeypatch.context() as m:
        m.setattr(PPOJob, "__init__", nothing_may_run)  # no set-up: no model loaded, nothing logged
        again = train(compose_cfg(*END, cache, "resume=auto"), run)
    assert again == json.loads(summary)
    assert untimed(again) == untimed(full)
    assert (run / "metrics.jsonl").read_bytes() == metrics
    assert (run / "summary.json").read_bytes() == summary

    # Killed while summary.json was being written (a truncated file): not finished, so resume=auto
    # redoes the final evaluation from the final checkpoint, logging its rows once.
    (run / "summary.json").write_bytes(summary[: len(summary) // 2])
    redone = train(compose_cfg(*END, cache, "resume=auto"), run)
    assert train_rows(run) == rows
    assert untimed(redone) == untimed(full)
