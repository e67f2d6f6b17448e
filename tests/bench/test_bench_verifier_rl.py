"""bench/verifier_rl.py: what each arm sets, and the training figures it reads from a run."""

import json

import pytest

from tests.support import load_script


def test_each_arm_composes_to_the_reward_it_names(tmp_path):
    from metarl_llm.runtime.setup import compose_config

    rl = load_script("bench/verifier_rl.py")
    assert rl.arm_overrides("rl_verifier", tmp_path, 2) == [
        "reward=verifier",
        f"reward.verifier={tmp_path / 'seed2' / 'verifier'}",
    ]
    assert rl.arm_overrides("rl_env", tmp_path, 2) == ["reward=env"]
    cfg = compose_config(["env=math", "bonus=none", *rl.arm_overrides("rl_verifier", tmp_path, 0)])
    cfg.validate()
    assert (cfg.reward.name, cfg.reward.verifier) == ("verifier", str(tmp_path / "seed0" / "verifier"))


def test_training_curve_averages_the_first_and_last_ten_iterations(tmp_path):
    rl = load_script("bench/verifier_rl.py")
    rows = [{"iteration": i, "train/outcome": i / 100, "train/reward": 0.5} for i in range(1, 31)]
    rows.insert(3, {"iteration": 3, "train/loss": 1.0})  # lines without the keys are skipped
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "summary.json").write_text(json.dumps({"heldout_success_start": 0.5, "heldout_success_final": 0.25}))
    t = rl.training_curve(tmp_path)
    assert t["train/outcome"] == pytest.approx([0.055, 0.255])  # means of 1..10 and 21..30, over 100
    assert t["train/reward"] == pytest.approx([0.5, 0.5])
    assert "train/reward_verifier_accuracy" not in t and t["heldout_success"] == [0.5, 0.25]


def test_the_table_reads_each_arm_at_each_n():
    rl = load_script("bench/verifier_rl.py")

    def seed(shift):
        curve = lambda m: {"n": [1, 2], "maj_at_n": [m, m + 0.1], "tokens": [10, 20]}  # noqa: E731
        training = {"train/reward": [0.4, 0.6], "train/outcome": [0.3, 0.5], "heldout_success": [0.5, 0.5]}
        return {
            "base": {**curve(0.2 + shift), "best_of_n": [0.2, 0.1]},
            "rl_verifier": {"wall_s": 100, "training": training, "curve": curve(0.3 + shift)},
            "rl_env": {"wall_s": 120, "training": training, "curve": curve(0.6 + shift)},
        }

    runs = {"0": seed(0.0), "1": seed(0.02)}
    table = rl.render({"command": "python train.py ...", "seeds": runs})
    assert "| 2 | 20 | 0.310 ± 0.127 | 0.100 ± 0.000 | 0.410 ± 0.127 (20) | 0.710 ± 0.127 (20) | n/a | 0.100 ± 0.000 |" in table
    with_vf = {
        k: {**v, "vf": {"wall_s": 50, "curve": {"n": [1, 2], "maj_at_n": [0.5, 0.7], "tokens": [30, 60]}}}
        for k, v in runs.items()
    }
    table = rl.render({"command": "python train.py ...", "seeds": with_vf})
    assert "| 0.710 ± 0.127 (20) | 0.700 ± 0.000 (60) | 0.100 ± 0.000 |" in table
    assert (
        "| RL, verifier reward | 0.400 ± 0.000 -> 0.600 ± 0.000 | 0.300 ± 0.000 -> 0.500 ± 0.000 | n/a | n/a | n/a | 0.500 ± 0.000 -> 0.500 ± 0.000 | 100-100 |"
        in table
    )
