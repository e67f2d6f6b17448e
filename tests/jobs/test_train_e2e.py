"""A 2-iteration end-to-end run through the real config, checking everything it writes."""

import json

import pytest

from metarl_llm.trainer import train
from tests.support import undocumented_keys

SMALL = [
    "algo.iterations=2",
    "algo.problems_per_iter=2",
    "algo.group_size=2",
    "algo.minibatch_size=2",
    "warm_start.steps=4",
    "warm_start.num_traces=64",
    "warm_start.batch_size=16",  # both phases of the curriculum
    "eval.num_problems=3",
    "eval.samples_per_problem=2",
    "eval.prover_samples=2",
    "eval.budget_scales=[0.5]",  # the final evaluation at two budgets (1 is always evaluated): the extrapolation path
    "eval.adaptation_episodes=[1,2]",  # the adaptation figures at two budgets: the path, not its size
    "checkpoint_every=1",
    "logger.progress_bar=false",
    # A small model (the default-sized one runs end to end in test_lora):
    # what is checked here (the files written, the metrics logged, the warm start's cache) does not depend on its size.
    "model.tiny.hidden_size=32",
    "model.tiny.num_layers=1",
    "model.tiny.num_heads=2",
    "model.tiny.intermediate_size=64",
]

SUMMARY_KEYS = {
    "env",
    "bonus",
    "seed",
    "iterations",
    "heldout_success_start",
    "heldout_success_final",
    "heldout_tokens_per_trial",
    "wall_time_s",
    "rollout_tokens_per_s",
    "update_tokens_per_s",
}


@pytest.mark.parametrize("env,bonus", [("planted_subseq", "info_gain"), ("math", "none")])
def test_two_iterations_write_all_outputs(compose_cfg, tmp_path, env, bonus):
    cfg = compose_cfg(f"env={env}", f"bonus={bonus}", *SMALL, f"warm_start.cache_dir={tmp_path / 'cache'}")
    run = tmp_path / "run"
    summary = train(cfg, run)

    assert SUMMARY_KEYS <= set(summary)
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk["iterations"] == 2 and on_disk["env"] == env and on_disk["seed"] == 0
    assert 0.0 <= on_disk["heldout_success_final"] <= 1.0
    assert on_disk["rollout_tokens_per_s"] > 0 and on_disk["update_tokens_per_s"] > 0
    assert on_disk["heldout_tokens_per_trial"] > 0

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/outcome" in r]
    assert [r["iteration"] for r in train_rows] == [1, 2]
    for r in train_rows:
        for key in (
            "train/approx_kl",
            "train/clipfrac",
            "train/entropy",
            "train/kl_ref",
            "train/tokens_per_trial",
            "perf/rollout_tokens_per_s",
            "perf/update_tokens_per_s",
            "train/success_by_episode_0",
        ):
            assert key in r, key
        assert r["train/logprob_mismatch_max"] < 1e-3  # sampling log-probs equal the policy's
        if bonus == "info_gain":
            assert "train/J/boundary_0" in r
    assert any("heldout/success" in r for r in rows)
    assert not undocumented_keys(rows), f"logged keys missing from docs/metrics.md: {undocumented_keys(rows)}"

    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text() == "iter_000002"
    assert (ckpts / "iter_000001" / "policy" / "config.json").exists()
    assert (ckpts / "iter_000002" / "policy" / "tokenizer.json").exists()  # tokenizer saved beside the model
    assert (run / "success_vs_tokens.png").stat().st_size > 0
    assert (run / "config.yaml").exists()
    assert list((run / "wandb").glob("offline-run-*")), "offline W&B run missing"

    again = train(cfg, tmp_path / "run2")
    assert again["warm_start_cached"] is True and summary["warm_start_cached"] is False
