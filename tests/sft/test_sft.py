"""Verifier-free baselines and verifier rewards: STaR and stitched records built from
hand-made trials, the SFT loss on policy tokens only (against a hand-computed masked
cross-entropy), the algo=sft job, reward=verifier in PPO, and bad input."""

import json

import gymnasium as gym
import numpy as np
import pytest
import torch

import envs  # noqa: F401
from metarl_llm.config import BudgetConfig, TinyModelConfig
from metarl_llm.core.trial import StreamCodec, Trial
from metarl_llm.models import build_char_tokenizer, build_tiny_model
from metarl_llm.sft.fit import sft_fit
from metarl_llm.sft.traces import failed_attempts, star_records, stitched_records
from tests.support import ROOT

ENV = "metarl/PlantedSubseq-v0"
BUDGET = BudgetConfig(max_episodes=3, max_episode_tokens=16, max_total_tokens=48, answer_max_tokens=16)


@pytest.fixture(scope="module")
def codec():
    return StreamCodec(build_char_tokenizer(), "\n", "Answer:")


def make_env(split, feedback=False):
    return gym.make(ENV, split=split, max_episodes=BUDGET.max_episodes, feedback=feedback)


def hand_trial(group, episodes, correct, outcome, ids=(1, 2, 3), action=(0, 1, 1)):
    t = Trial(problem_id=f"p{group}", group=group, ids=list(ids), action=list(action))
    t.episode_texts, t.episode_correct = list(episodes), list(correct)
    t.answer_episode, t.outcome = len(episodes) - 1, float(outcome)
    return t


def gold_of(seed):
    env = make_env("train")
    env.reset(seed=seed)
    return env.unwrapped.reference_answer


def test_star_records_are_the_successful_trials_with_their_action_masks():
    trials = [
        hand_trial(0, ["Answer: 1"], [True], 1.0, ids=(5, 6, 7, 8), action=(0, 0, 1, 1)),
        hand_trial(0, ["Answer: 2"], [False], 0.0),
        hand_trial(1, ["12", "Answer: 3"], [False, True], 1.0, ids=(9, 10, 11), action=(0, 1, 1)),
    ]
    recs = star_records(trials)
    assert recs == [
        {"input_ids": [5, 6, 7, 8], "completion_mask": [0, 0, 1, 1]},
        {"input_ids": [9, 10, 11], "completion_mask": [0, 1, 1]},
    ]


def test_failed_attempts_are_the_intermediate_episodes_not_marked_correct():
    trials = [
        hand_trial(0, ["a", "b", "Answer: x"], [False, True, False], 0.0),
        hand_trial(0, ["c", "Answer: y"], [False, True], 1.0),
    ]
    assert failed_attempts(trials) == ["a", "c"]  # "b" was correct; answer episodes are never attempts


@pytest.mark.parametrize("n_min,n_max", [(2, 2), (0, 1), (1, 2)])
def test_stitched_traces_have_the_configured_structure(codec, n_min, n_max):
    """Each trace: n in [n_min, n_max] failed attempts of the problem, then a successful
    trial's answer episode; replayed through the environment (here with feedback, so a
    "[wrong]" observation follows each failed attempt), observations masked."""
    tok = codec.tokenizer
    seeds = {0: 11, 1: 22}
    trials = []
    pools = {}
    for g, sd in seeds.items():
        gold = gold_of(sd)
        miss = [str((int(d) + k) % 10) * 4 for k, d in zip((1, 2), gold[:2])]
        miss = [m for m in miss if gold not in m]
        pools[g] = set(miss)
        win = f"Answer: {gold}0"
        trials += [
            hand_trial(g, [miss[0], win], [False, True], 1.0),
            hand_trial(g, [miss[-1], "Answer: 0000"], [False, False], 0.0),
        ]
    trials.append(hand_trial(2, ["Answer: 0000"], [False], 0.0))  # no success: no trace for problem 2
    resets = {g: {"seed": sd} for g, sd in seeds.items()}
    resets[2] = {"seed": 33}
    recs, counts = stitched_records(
        trials, lambda split: make_env(split, feedback=True), codec, BUDGET, resets, 5, n_min, n_max, np.random.default_rng(0)
    )
    assert counts["problems"] == 3 and counts["problems_with_success"] == 2
    assert counts["traces"] == len(recs) == 10 and counts["rejected"] == 0
    assert sum(counts[f"n_failed_{k}"] for k in range(n_min, n_max + 1)) == 10
    for i, r in enumerate(recs):
        g = i // 5
        ids, mask = r["input_ids"], r["completion_mask"]
        assert len(ids) == len(mask) and ids[-1] == tok.eos_token_id and mask[-1] == 1
        policy = tok.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=True)
        episodes = policy.split("\n")
        n = len(episodes) - 1
        assert n_min <= n <= n_max
        assert set(episodes[:-1]) <= pools[g]  # the failures are that problem's own failed attempts
        assert episodes[-1] == f"Answer: {gold_of(seeds[g])}0"
        other = tok.decode([t for t, m in zip(ids, mask) if not m], skip_special_tokens=True)
        assert "Answer" not in other and "[wrong]" not in policy
        assert other.count("[wrong]") == n  # one observation per failed attempt, masked
        assert other.startswith(make_env("train").reset(seed=seeds[g])[0])  # the prompt is masked


def test_stitched_traces_check_the_budget_and_the_range(codec):
    with pytest.raises(ValueError, match="max_episodes"):
        stitched_records([], make_env, codec, BUDGET, {}, 1, 0, 3, np.random.default_rng(0))
    with pytest.raises(ValueError, match="n_failed_min"):
        stitched_records([], make_env, codec, BUDGET, {}, 1, 2, 1, np.random.default_rng(0))


def test_sft_loss_covers_only_policy_tokens(codec):
    """trl's SFTTrainer, as sft_fit configures it, computes the loss of a batch of our
    records as the mean cross-entropy over completion-mask tokens only (hand-computed);
    the masked prompt and observation tokens carry label -100."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tok = codec.tokenizer
    torch.manual_seed(0)
    model = build_tiny_model(
        TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), len(tok), tok.pad_token_id, 0
    )
    recs = [
        {"input_ids": [5, 6, 7, 8, 9, 10], "completion_mask": [0, 0, 1, 1, 0, 1]},
        {"input_ids": [11, 12, 13, 14], "completion_mask": [0, 1, 1, 1]},
    ]
    args = SFTConfig(
        output_dir="/tmp/unused",
        completion_only_loss=True,
        max_length=None,
        report_to=[],
        use_cpu=True,
        per_device_train_batch_size=2,
        activation_checkpointing=False,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(recs), processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    mask = torch.zeros_like(batch["input_ids"])
    for i, r in enumerate(recs):
        mask[i, : len(r["completion_mask"])] = torch.tensor(r["completion_mask"])
    assert torch.equal(batch["labels"] == -100, mask == 0)
    model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
        m = mask[:, 1:].float()
        by_hand = -(lp * m).sum() / m.sum()
    assert torch.allclose(loss, by_hand, atol=1e-5)


def test_sft_fit_rejects_empty_or_maskless_records(codec):
    with pytest.raises(ValueError, match="no records"):
        sft_fit(None, codec.tokenizer, [], 1, 1, 1e-3, 0)
    with pytest.raises(ValueError, match="no completion token"):
        sft_fit(None, codec.tokenizer, [{"input_ids": [1, 2], "completion_mask": [0, 0]}], 1, 1, 1e-3, 0)


# ------------------------------------------------------------------ jobs

SMALL = [
    "model.tiny.hidden_size=32",
    "model.tiny.num_layers=1",
    "model.tiny.num_heads=2",
    "model.tiny.intermediate_size=64",
    "warm_start.steps=20",
    "warm_start.num_traces=64",
    "warm_start.batch_size=16",
    "warm_start.lr=3e-3",
    "warm_start.replay_fraction=0",
    "warm_start.focused_until_loss=0",  # both needed: a 20-step base policy that still writes failed attempts (stitched data)
    "env.gold_length=1",
    "env.chunk_length=2",
    "env.input_length=4",
    "logger.mode=disabled",
    "logger.progress_bar=false",
    "threads=1",
    "diagnostics.num_problems=3",
    "diagnostics.num_continuations=2",
    "diagnostics.num_rollouts=2",
]


def cfg_of(tmp_path, *overrides):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from metarl_llm.runtime.setup import register_configs

    register_configs()
    with initialize_config_dir(version_base=None, config_dir=str(ROOT / "conf")):
        return OmegaConf.to_object(
            compose("config", overrides=[*SMALL, f"warm_start.cache_dir={tmp_path / 'cache'}", *overrides])
        )


@pytest.mark.parametrize("data", ["star", "stitched"])
def test_algo_sft_job_writes_policy_summary_and_diagnostics(tmp_path, data):
    from metarl_llm.trainer import train

    cfg = cfg_of(
        tmp_path,
        "algo=sft",
        f"sft.data={data}",
        "sft.num_train_problems=24",
        "sft.samples_per_problem=4",
        "sft.steps=2",
        "sft.batch_size=8",
        "sft.num_heldout_problems=3",
        "sft.n_values=[1,2]",
        "sft.budget_scales=[1,2]",
        "sft.sequential_samples=1",
        "sft.traces_per_problem=2",
    )
    out = train(cfg, tmp_path / data)
    on_disk = json.loads((tmp_path / data / "summary.json").read_text())
    assert out["algo"] == on_disk["algo"] == "sft" and on_disk["sft/data"] == data
    assert on_disk["sft/records"] >= 1 and on_disk["parallel"]["n"] == [1, 2]
    assert on_disk["sequential"]["scale"] == [1.0, 2.0]
    assert on_disk["parallel"]["pass_at_n"][1] >= on_disk["parallel"]["pass_at_n"][0]
    for key in ("diagnostics/heterogeneity", "diagnostics/anti_concentration", "diagnostics/success"):
        assert key in on_disk
    assert (tmp_path / data / "policy" / "config.json").exists()
    rows = [json.loads(x) for x in (tmp_path / data / "metrics.jsonl").read_text().splitlines()]
    assert any("diagnostics/heterogeneity" in r for r in rows) and any("vf_parallel/maj_at_n@2" in r for r in rows)


def test_reward_verifier_replaces_the_outcome_in_ppo(tmp_path):
    """reward=verifier: PPO optimises the saved verifier's P(success); train/outcome stays
    the environment's, train/reward is the verifier's, equal to score_trials of the same
    trials (checked through the rollout of a recorded iteration)."""
    from metarl_llm.jobs.common import validate
    from metarl_llm.jobs.ppo import PPOJob
    from metarl_llm.trainer import train
    from metarl_llm.verify.model import build_verifier
    from metarl_llm.verify.scoring import score_trials

    tok = build_char_tokenizer()
    verifier = build_verifier(tok, tiny=TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), seed=1)
    with torch.no_grad():
        torch.nn.init.normal_(verifier.head.weight, std=1.0)  # scores that differ between trials
    verifier.save(tmp_path / "v")
    seen = {}
    real_score = PPOJob.score

    def spy(self, roll):  # the score stage: its batch's outcome is the reward PPO optimises
        scored = real_score(self, roll)
        seen["reward"] = scored.batch.outcome
        seen["ref"] = score_trials(self.reward_verifier, roll.trials, rows=self.cfg.reward.rows)
        seen["outcome"] = [t.outcome for t in roll.trials]
        return scored

    with pytest.MonkeyPatch.context() as m:
        m.setattr(PPOJob, "score", spy)
        cfg = cfg_of(
            tmp_path,
            "reward=verifier",
            f"reward.verifier={tmp_path / 'v'}",
            "algo.iterations=1",
            "algo.problems_per_iter=2",
            "algo.group_size=2",
            "algo.minibatch_size=4",
            "eval.num_problems=2",
            "eval.samples_per_problem=1",
            "eval.extrapolation=false",
            "eval.adaptation=false",
            "checkpoint_every=0",
        )
        train(cfg, tmp_path / "run")
    row = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if "train/reward" in x][0]
    np.testing.assert_allclose(seen["reward"].numpy(), seen["ref"], atol=1e-6)
    assert row["train/reward"] == pytest.approx(float(seen["reward"].mean()), abs=1e-6)
    assert row["train/outcome"] == pytest.approx(float(np.mean(seen["outcome"])), abs=1e-6)
    assert 0.0 <= row["train/reward_verifier_accuracy"] <= 1.0
    with pytest.raises(ValueError, match="reward.verifier"):
        validate(cfg_of(tmp_path, "reward=verifier"))
    with pytest.raises(ValueError, match="reward.verifier"):
        validate(cfg_of(tmp_path, "reward=verifier", f"reward.verifier={tmp_path / 'nothing'}"))


def test_the_chunked_sft_loss_equals_trls_own(qwen_dir):
    """The warm start's loss (LM head at completion tokens only, metarl_llm.models.causal_lm_scores)
    against trl's SFTTrainer loss on the same batch of a production-vocabulary model."""
    import tempfile

    import torch
    from datasets import Dataset
    from trl import SFTConfig as TrlSFTConfig
    from trl import SFTTrainer

    from metarl_llm.config import ModelConfig
    from metarl_llm.models import load_policy
    from metarl_llm.sft.fit import chunked_loss_trainer

    model, tok = load_policy(ModelConfig(name_or_path=str(qwen_dir)), 0)
    g = torch.Generator().manual_seed(0)
    records = []
    for n in (7, 12, 9):
        ids = torch.randint(0, len(tok), (n,), generator=g).tolist()
        records.append({"input_ids": ids, "completion_mask": [0] * 3 + [1] * (n - 3)})
    with tempfile.TemporaryDirectory() as tmp:
        args = TrlSFTConfig(
            output_dir=tmp, per_device_train_batch_size=3, completion_only_loss=True, max_length=None,
            report_to=[], use_cpu=True, bf16=False, activation_checkpointing=False,
        )  # fmt: skip
        data = Dataset.from_list(records)
        theirs = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
        ours = chunked_loss_trainer()(model=model, args=args, train_dataset=data, processing_class=tok)
        batch = next(iter(theirs.get_train_dataloader()))
        with torch.no_grad():
            a = float(theirs.compute_loss(model, dict(batch)))
            b = float(ours.compute_loss(model, dict(batch)))
    assert abs(a - b) < 1e-5 * max(1.0, abs(a)) and a > 1.0  # random weights over 151k ids: a large loss
