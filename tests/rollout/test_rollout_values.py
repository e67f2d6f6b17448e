"""The critic's values computed by the rollout engines while sampling (``run_trials(...,
value_head=...)``, ``Trial.sample_values``): equal to ``ActorCritic.score``'s values at the
action tokens (full-weight and LoRA policies), without changing a sampled token or
log-prob; with ``algo.old_logprobs=sampled`` and a shared critic the trainer scores a PPO
batch without any policy forward and gets the same values, advantages and run."""

import json
import math

import gymnasium as gym
import pytest
import torch

import envs as _registers_envs  # noqa: F401  (registers the environments)
from metarl_llm.config import BudgetConfig, ModelConfig, PolicyLoraConfig, TinyModelConfig
from metarl_llm.core.batch import collate, place_rewards, sampled_logprobs, sampled_values
from metarl_llm.core.trial import StreamCodec, Trial
from metarl_llm.jobs.ppo import PPOJob
from metarl_llm.models import ActorCritic, build_actor_critic, build_char_tokenizer, build_tiny_model
from metarl_llm.rl.advantages import get_advantage
from metarl_llm.rl.scoring import score_batch
from metarl_llm.rollout.base import Engine
from metarl_llm.rollout.cached import CachedEngine
from metarl_llm.rollout.engine import get_engine, run_trials
from metarl_llm.rollout.hf_generate import HFGenerateEngine
from metarl_llm.rollout.reencode import ReencodeEngine
from metarl_llm.trainer import train
from tests.support import QUICK_RUN

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # raised inside peft

TINY = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
# Four episodes before the forced answer; the total budget cuts some trials earlier.
BUDGET = BudgetConfig(max_episodes=4, max_episode_tokens=9, max_total_tokens=30, answer_max_tokens=6)
MATH = "metarl/Math-v0"  # prompts of 8 and ~63 tokens: several prefill groups with a small bucket cost

ENGINES = {
    "cached": lambda: CachedEngine(),
    # prompts prefilled in several groups, row chunks of 5, observations of > 2 tokens fed as blocks, rows dropped
    "cached_grouped": lambda: CachedEngine(max_rows=5, bucket_tokens=8, queue_tokens=2),
    "cached_blocks": lambda: CachedEngine(queue_tokens=0),  # every observation one block
    "reencode": lambda: ReencodeEngine(),
    "hf_generate": lambda: HFGenerateEngine(),
}


def randomise_critic(ac: ActorCritic, seed: int = 0) -> ActorCritic:
    """A value head that is not all zeros (zeros would match anything)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ac.value_head.weight.copy_(torch.randn(ac.value_head.weight.shape, generator=g) * 0.2)
        ac.value_head.bias.fill_(0.3)
    return ac


@pytest.fixture(scope="module")
def setup():
    tok = build_char_tokenizer()
    model = build_tiny_model(TINY, len(tok), tok.pad_token_id, 0)
    return randomise_critic(ActorCritic(model).eval()), StreamCodec(tok, "\n", "Answer:")


@pytest.fixture(scope="module")
def lora_setup():
    """A LoRA policy whose adapter is not the identity (B randomised) and a random critic."""
    tok = build_char_tokenizer()
    model = build_tiny_model(TINY, len(tok), tok.pad_token_id, 0)
    ac = build_actor_critic(model, ModelConfig(tiny=TINY, lora=PolicyLoraConfig(r=4, alpha=8.0)), seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in ac.policy.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return randomise_critic(ac.eval(), 2), StreamCodec(tok, "\n", "Answer:")


def play(ac, codec, engine, value_head=None, n=12, env_id=MATH):
    torch.manual_seed(5)  # hf_generate samples from the global generator
    env_list = [gym.make(env_id, max_episodes=BUDGET.max_episodes) for _ in range(n)]
    resets, groups = [{"seed": 100 + i // 2} for i in range(n)], [i // 2 for i in range(n)]
    return run_trials(
        ac.policy, codec, env_list, resets, groups, BUDGET, torch.Generator().manual_seed(0), engine=engine, value_head=value_head
    )


def check_values_equal_score(ac, codec, trials):
    """Trial.sample_values == ActorCritic.score(...).values at the action tokens (1e-5), 0 elsewhere."""
    batch = collate(trials, codec.pad_id)
    with torch.no_grad():
        scored = ac.score(batch.input_ids, batch.attention_mask, with_values=True).values
    rolled = sampled_values(trials, batch.input_ids.shape[1])
    mask = batch.action_mask
    assert mask.sum() > 200
    assert float(((rolled - scored).abs() * mask).max()) < 1e-5
    assert torch.equal(rolled, rolled * mask)  # 0 on prompt, observation and padding tokens
    assert float((scored * mask).std()) > 0.1  # a real critic: values vary across tokens


@pytest.mark.parametrize("engine", list(ENGINES))
def test_engine_values_equal_the_scoring_forward(setup, one_thread, engine):
    ac, codec = setup
    trials = play(ac, codec, ENGINES[engine](), ac.value_head)
    # Multi-episode: observations inserted between episodes, and forced answers.
    assert max(len(t.episode_texts) for t in trials) == BUDGET.max_episodes + 1 and any(t.forced for t in trials)
    assert any(0 < t.policy_tokens < BUDGET.max_total_tokens for t in trials)
    check_values_equal_score(ac, codec, trials)


@pytest.mark.parametrize("engine", ["cached", "cached_grouped", "reencode"])
def test_engine_values_of_a_lora_policy(lora_setup, one_thread, engine):
    ac, codec = lora_setup
    trials = play(ac, codec, ENGINES[engine](), ac.value_head)
    check_values_equal_score(ac, codec, trials)
    batch = collate(trials, codec.pad_id)
    with torch.no_grad(), ac.adapter.disable_adapter():  # the adapter really changes the hidden states
        base = ac.score(batch.input_ids, batch.attention_mask, with_values=True).values
    assert float(((base - sampled_values(trials, batch.input_ids.shape[1])).abs() * batch.action_mask).max()) > 1e-2


@pytest.mark.parametrize("engine", list(ENGINES))
def test_the_value_head_changes_no_token_or_logprob(setup, one_thread, engine):
    ac, codec = setup
    with_values = play(ac, codec, ENGINES[engine](), ac.value_head)
    without = play(ac, codec, ENGINES[engine]())
    assert [t.ids for t in with_values] == [t.ids for t in without]
    assert [t.sample_logprobs for t in with_values] == [t.sample_logprobs for t in without]  # bit for bit
    assert [t.episode_texts for t in with_values] == [t.episode_texts for t in without]
    assert all(t.sample_values is None for t in without) and all(len(t.sample_values) == len(t.ids) for t in with_values)
    with pytest.raises(ValueError, match="no values"):
        sampled_values(without, max(len(t.ids) for t in without))  # never silent zeros


def test_the_kept_cache_is_the_same_with_values(setup, one_thread):
    """The meta-prover's kept KV caches (keep_cache) do not change with the value head."""
    ac, codec = setup
    a, b = play_keep(ac, codec, ac.value_head), play_keep(ac, codec, None)
    assert [t.ids for t in a] == [t.ids for t in b] and all(t.sample_values is not None for t in a)
    for x, y in zip(a, b):
        assert x.cache.length == y.cache.length == len(x.ids) - 1
        assert all(torch.equal(k1, k2) for k1, k2 in zip(x.cache.keys, y.cache.keys))
        assert all(torch.equal(v1, v2) for v1, v2 in zip(x.cache.values, y.cache.values))
    check_values_equal_score(ac, codec, a)


def play_keep(ac, codec, value_head, n=12):
    env_list = [gym.make(MATH, max_episodes=BUDGET.max_episodes) for _ in range(n)]
    resets, groups = [{"seed": 100 + i // 2} for i in range(n)], [i // 2 for i in range(n)]
    return run_trials(
        ac.policy,
        codec,
        env_list,
        resets,
        groups,
        BUDGET,
        torch.Generator().manual_seed(0),
        engine=CachedEngine(max_rows=5, bucket_tokens=8, queue_tokens=2),
        keep_cache=True,
        value_head=value_head,
    )


def test_engines_without_values_are_refused_and_trials_check_their_values(setup):
    ac, codec = setup

    class NoValues(Engine):  # a backend written before value_head existed
        def run_trials(
            self, model, codec, envs, resets, groups, budget, generator=None, keep_cache=False, greedy=False, keys=None
        ):
            raise AssertionError("not reached")

    with pytest.raises(ValueError, match="cannot compute the critic's values"):
        run_trials(ac.policy, codec, [], [], [], BUDGET, engine=NoValues(), value_head=ac.value_head)
    assert all(get_engine(name).supports_values for name in ("cached", "reencode", "hf_generate"))
    t = Trial("p", 0)
    t.append([1, 2], False, -1)
    t.append([3, 4], True, 0, [-0.1, -0.2], [0.5, 0.6])
    t.append([5], False, -1)
    assert t.sample_values == [0.0, 0.0, 0.5, 0.6, 0.0]
    with pytest.raises(ValueError, match="without values"):
        t.append([6], True, 1, [-0.3])
    u = Trial("q", 0)
    u.append([1], False, -1)
    u.append([2], True, 0, [-0.1])
    with pytest.raises(ValueError, match="after episodes without values"):
        u.append([3], True, 1, [-0.1], [0.2])


def test_score_batch_with_rollout_values_runs_no_policy_forward(setup, one_thread):
    """Same values (hence GAE advantages and returns) as the forward, no ActorCritic.score call."""
    ac, codec = setup
    trials = play(ac, codec, CachedEngine(max_rows=5, bucket_tokens=8, queue_tokens=2), ac.value_head)
    batch = collate(trials, codec.pad_id)
    width = batch.input_ids.shape[1]
    sampling = sampled_logprobs(trials, width)
    calls = []
    real = ac.score
    ac.score = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        stats = {}
        fast = score_batch(
            ac,
            ac.policy,
            batch,
            True,
            rows=5,
            sampling=sampling,
            old_logprobs="sampled",
            bucket_tokens=16,
            stats=stats,
            sampled_values=sampled_values(trials, width),
        )
        assert calls == [] and math.isnan(stats["logprob_mismatch_max"])
        slow = score_batch(ac, ac.policy, batch, True, rows=5, sampling=sampling, old_logprobs="sampled", bucket_tokens=16)
        assert calls  # without rollout values the forward runs for the values
    finally:
        del ac.score
    assert torch.equal(fast.logprobs, slow.logprobs) and torch.equal(fast.ref_logprobs, slow.ref_logprobs)
    assert float((fast.values - slow.values).abs().max()) < 1e-5 and torch.equal(fast.values, fast.values * batch.action_mask)
    rewards = place_rewards(fast, [], 0.05, True)
    assert torch.equal(rewards, place_rewards(slow, [], 0.05, True))
    gae = get_advantage("gae")
    adv_f, ret_f = gae(rewards, fast.values, fast.action_mask, gamma=1.0, lam=0.95, group=fast.group)
    adv_s, ret_s = gae(rewards, slow.values, slow.action_mask, gamma=1.0, lam=0.95, group=slow.group)
    assert float((adv_f - adv_s).abs().max()) < 1e-5 and float((ret_f - ret_s).abs().max()) < 1e-5
    for bad in ({"old_logprobs": "recompute", "use": True}, {"old_logprobs": "sampled", "use": False}):
        with pytest.raises(ValueError, match="sampled_values"):
            score_batch(
                ac,
                ac.policy,
                batch,
                bad["use"],
                sampling=sampling,
                old_logprobs=bad["old_logprobs"],
                sampled_values=sampled_values(trials, width),
            )
    with pytest.raises(ValueError, match="shape"):
        score_batch(
            ac,
            ac.policy,
            batch,
            True,
            sampling=sampling,
            old_logprobs="sampled",
            sampled_values=sampled_values(trials, width + 1),
        )


SMALL = [
    *QUICK_RUN,
    "algo=ppo",
    "algo.old_logprobs=sampled",
    "env=math",
    "algo.iterations=2",
    "algo.problems_per_iter=2",
    "algo.group_size=3",
    "algo.minibatch_size=3",
    "eval.num_problems=1",
    "eval.samples_per_problem=1",
    "algo.ent_coef=0.05",
    "algo.lam=0.95",  # advantages and returns depend on the values (with lam=1 and zero outcomes they would not)
    # A small model: which forward computes the values does not depend on its size (the default-sized
    # model runs end to end in test_lora).
    "model.tiny.hidden_size=32",
    "model.tiny.num_layers=1",
    "model.tiny.num_heads=2",
    "model.tiny.intermediate_size=64",
]


def run(compose_cfg, tmp_path, monkeypatch, name, *overrides, engine_values=True):
    """A 2-iteration PPO run; returns (per-iteration train metrics, scoring records, and per
    rollout whether the engine computed the values). The PPO job's stages are the seams."""
    cfg = compose_cfg(*SMALL, f"warm_start.cache_dir={tmp_path / 'cache'}", *overrides)
    records = []
    real_setup, real_rollout, real_score = PPOJob._setup_models, PPOJob.rollout, PPOJob.score
    state = {"scoring": False, "value_head": []}
    real_forward = ActorCritic.score

    def counting_score(self, *a, **k):
        if state["scoring"]:
            records[-1]["policy_forwards"] += 1
        return real_forward(self, *a, **k)

    def setup_models(job):
        real_setup(job)
        randomise_critic(job.actor_critic, 3)

    def rollout(job, it):
        roll = real_rollout(job, it)
        state["value_head"].append(job.actor_critic.value_head if all(t.sample_values is not None for t in roll.trials) else None)
        return roll

    def score(job, roll):
        records.append({"policy_forwards": 0, "sampled_values": job.rollout_values})
        state["scoring"] = True
        try:
            out = real_score(job, roll)
        finally:
            state["scoring"] = False
        if job.rollout_values:  # the forward's values, for comparison (not used by the run)
            batch = collate(roll.trials, job.codec.pad_id)
            records[-1]["forward_values"] = score_batch(
                job.actor_critic,
                job.reference,
                batch,
                job.use_critic,
                amp_dtype=job.amp,
                sampling=sampled_logprobs(roll.trials, batch.input_ids.shape[1]),
                old_logprobs=job.cfg.algo.old_logprobs,
                bucket_tokens=job.cfg.algo.length_bucket_tokens,
            ).values
        records[-1]["values"], records[-1]["mask"] = out.batch.values, out.batch.action_mask
        return out

    monkeypatch.setattr(PPOJob, "_setup_models", setup_models)
    monkeypatch.setattr(PPOJob, "rollout", rollout)
    monkeypatch.setattr(PPOJob, "score", score)
    monkeypatch.setattr(ActorCritic, "score", counting_score)
    if not engine_values:
        monkeypatch.setattr(CachedEngine, "supports_values", False)
    try:
        train(cfg, tmp_path / name)
    finally:
        monkeypatch.undo()
    rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    rows = [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows if "train/outcome" in r]
    return rows, records, state["value_head"]


def test_ppo_with_sampled_old_logprobs_scores_without_the_policy_forward(compose_cfg, tmp_path, monkeypatch, one_thread):
    rows, records, heads = run(compose_cfg, tmp_path, monkeypatch, "rollout_values")
    assert len(rows) == len(records) == 2 and all(h is not None for h in heads)
    for r in records:
        assert r["sampled_values"] and r["policy_forwards"] == 0  # only the reference's forward ran
        assert float((r["values"] * r["mask"]).abs().max()) > 0.1
        assert float((r["values"] - r["forward_values"]).abs().max()) < 1e-5
    assert all(x["train/logprob_mismatch_max"] is None for x in rows)  # NaN (logged as null): no policy forward
    # The same run with the values from the scoring forward (an engine without values: the fallback).
    ref_rows, ref_records, ref_heads = run(compose_cfg, tmp_path, monkeypatch, "forward_values", engine_values=False)
    assert all(h is None for h in ref_heads)
    assert all(not r["sampled_values"] and r["policy_forwards"] >= 1 for r in ref_records)
    assert all(x["train/logprob_mismatch_max"] < 1e-5 for x in ref_rows)
    for a, b in zip(rows, ref_rows):
        assert a.keys() == b.keys()
        for k in a:
            if k != "train/logprob_mismatch_max":
                assert (a[k] is None and b[k] is None) or a[k] == pytest.approx(b[k], abs=1e-5, rel=1e-5), k
    # A separate critic (its own trunk) and old_logprobs=recompute keep the scoring forward.
    # (One iteration each: every iteration scores its batch the same way.)
    for name, override in (("separate", "model.critic=separate"), ("recompute", "algo.old_logprobs=recompute")):
        _, recs, heads = run(compose_cfg, tmp_path, monkeypatch, name, override, "algo.iterations=1")
        assert all(h is None for h in heads) and all(not r["sampled_values"] and r["policy_forwards"] for r in recs)
