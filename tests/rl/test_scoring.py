"""The scoring pass after a rollout (trainer.score_batch): old log-probs taken from the
sampling passes (algo.old_logprobs=sampled) equal a recomputation; rows grouped by length
(algo.length_bucket_tokens, batch.length_buckets) change only float rounding."""

import itertools
import math

import gymnasium as gym
import pytest
import torch

import envs  # noqa: F401
from metarl_llm.config import BudgetConfig, TinyModelConfig
from metarl_llm.core.batch import collate, length_buckets, sampled_logprobs
from metarl_llm.core.trial import StreamCodec
from metarl_llm.jobs.common import validate
from metarl_llm.models import ActorCritic, build_char_tokenizer, build_tiny_model
from metarl_llm.rl.scoring import score_batch
from metarl_llm.rl.update import update_passes
from metarl_llm.rollout.engine import run_trials

BUDGET = BudgetConfig(max_episodes=3, max_episode_tokens=9, max_total_tokens=24, answer_max_tokens=6)


@pytest.fixture(scope="module")
def setup():
    tok = build_char_tokenizer()
    model = build_tiny_model(
        TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64), len(tok), tok.pad_token_id, 0
    )
    ac = ActorCritic(model).eval()
    with torch.no_grad():  # a critic that is not all zeros
        ac.value_head.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    return ac, StreamCodec(tok, "\n", "Answer:")


def rollout(ac, codec, n=12):
    """Multi-episode math trials (prompts of 8 and ~63 tokens), as one PPO iteration plays them."""
    env_list = [gym.make("metarl/Math-v0", max_episodes=BUDGET.max_episodes) for _ in range(n)]
    resets, groups = [{"seed": 100 + i // 2} for i in range(n)], [i // 2 for i in range(n)]
    return run_trials(ac.policy, codec, env_list, resets, groups, BUDGET, torch.Generator().manual_seed(0))


def score(ac, trials, codec, use_critic, old, bucket=0, counter=None):
    batch = collate(trials, codec.pad_id)
    stats = {}
    if counter is not None:
        real = ac.score
        ac.score = lambda *a, **k: counter.append(1) or real(*a, **k)
    try:
        out = score_batch(
            ac,
            ac.policy,
            batch,
            use_critic,
            rows=5,
            sampling=sampled_logprobs(trials, batch.input_ids.shape[1]),
            old_logprobs=old,
            bucket_tokens=bucket,
            stats=stats,
        )
    finally:
        if counter is not None:
            del ac.score
    return out, stats


def test_sampled_old_logprobs_equal_the_recomputed_ones(setup, one_thread):
    ac, codec = setup
    trials = rollout(ac, codec)
    assert max(len(t.episode_texts) for t in trials) > 1 and len({len(t.ids) for t in trials}) > 3
    recomputed, rstats = score(ac, trials, codec, use_critic=False, old="recompute")
    calls = []
    sampled, sstats = score(ac, trials, codec, use_critic=False, old="sampled", counter=calls)
    mask = recomputed.action_mask
    assert mask.sum() > 100
    assert float(((sampled.logprobs - recomputed.logprobs).abs()).max()) < 1e-5
    assert torch.equal(sampled.logprobs, sampled.logprobs * mask)  # 0 off action tokens, as recomputed ones
    assert torch.equal(sampled.ref_logprobs, recomputed.ref_logprobs)
    # No critic: the policy's forward is skipped, so the mismatch check cannot run.
    assert calls == [] and math.isnan(sstats["logprob_mismatch_max"]) and rstats["logprob_mismatch_max"] < 1e-5
    # With a critic the forward runs for the values; the log-probs stay the sampled ones.
    calls = []
    with_critic, cstats = score(ac, trials, codec, use_critic=True, old="sampled", counter=calls)
    critic_ref, _ = score(ac, trials, codec, use_critic=True, old="recompute")
    assert calls and torch.equal(with_critic.logprobs, sampled.logprobs)
    assert torch.equal(with_critic.values, critic_ref.values) and float(critic_ref.values.abs().max()) > 0
    assert cstats["logprob_mismatch_max"] == rstats["logprob_mismatch_max"]
    with pytest.raises(ValueError, match="sampling"):
        score_batch(ac, ac.policy, collate(trials, codec.pad_id), False, old_logprobs="sampled")
    with pytest.raises(ValueError, match="algo.old_logprobs='cached'"):
        score_batch(ac, ac.policy, collate(trials, codec.pad_id), False, old_logprobs="cached")


def test_length_grouped_scoring_equals_one_padded_pass(setup, one_thread):
    ac, codec = setup
    trials = rollout(ac, codec)
    lengths = [len(t.ids) for t in trials]
    assert len(length_buckets(lengths, 16, max_rows=5)) > len(range(0, len(trials), 5))  # more, shorter passes
    plain, _ = score(ac, trials, codec, use_critic=True, old="recompute", bucket=0)
    grouped, _ = score(ac, trials, codec, use_critic=True, old="recompute", bucket=16)
    for name in ("logprobs", "values", "ref_logprobs"):
        a, b = getattr(plain, name), getattr(grouped, name)
        assert float((a - b).abs().max()) < 1e-5, name
        assert torch.equal(b, b * plain.action_mask), name  # still 0 off action tokens


def brute_force(lengths, pass_tokens, max_tokens=0, max_rows=0):
    """The least cost over every way of cutting the longest-first order into runs."""
    sizes = sorted(lengths, reverse=True)
    n, best = len(sizes), math.inf
    for cuts in itertools.product([0, 1], repeat=n - 1):
        bounds = [0] + [i + 1 for i, c in enumerate(cuts) if c] + [n]
        runs = [(sizes[a], b - a) for a, b in zip(bounds, bounds[1:])]
        if max_rows and any(r > max_rows for _, r in runs):
            continue
        if max_tokens and any(w * r > max_tokens and r > 1 for w, r in runs):
            continue
        best = min(best, sum(w * r + pass_tokens for w, r in runs))
    return best


@pytest.mark.parametrize(
    "pass_tokens,max_tokens,max_rows", [(1, 0, 0), (8, 0, 0), (30, 0, 0), (8, 40, 0), (4, 0, 3), (500, 0, 0)]
)
def test_length_buckets_is_an_optimal_partition(pass_tokens, max_tokens, max_rows):
    g = torch.Generator().manual_seed(pass_tokens + max_tokens + max_rows)
    for _ in range(5):
        lengths = torch.randint(1, 25, (9,), generator=g)
        parts = length_buckets(lengths, pass_tokens, max_tokens=max_tokens, max_rows=max_rows)
        assert sorted(torch.cat(parts).tolist()) == list(range(9))  # a partition
        for p in parts:
            assert not max_rows or len(p) <= max_rows
            assert not max_tokens or len(p) * int(lengths[p].max()) <= max_tokens or len(p) == 1
        cost = sum(len(p) * int(lengths[p].max()) + pass_tokens for p in parts)
        assert cost == brute_force(lengths.tolist(), pass_tokens, max_tokens, max_rows)


def test_length_buckets_off_and_in_the_update():
    lengths = torch.tensor([60, 117, 60, 117, 60])
    assert [p.tolist() for p in length_buckets(lengths, 0)] == [[0, 1, 2, 3, 4]]  # off: one pass in order
    assert [p.tolist() for p in length_buckets(lengths, 0, max_rows=2)] == [[0, 1], [2, 3], [4]]
    assert [p.tolist() for p in length_buckets(lengths, 128)] == [[1, 3], [0, 2, 4]]  # 234 + 180 + 256 < 585 + 128
    assert [p.tolist() for p in length_buckets(lengths, 1000)] == [[1, 3, 0, 2, 4]]  # a pass costs more than the padding
    assert [p.tolist() for p in update_passes(lengths, 0, 0)] == [[0, 1, 2, 3, 4]]  # micro_batches as before
    assert [p.tolist() for p in update_passes(lengths, 200, 1000)] == [[1], [3], [0, 2, 4]]  # the budget still caps
    with pytest.raises(ValueError, match="pass_tokens"):
        length_buckets(lengths, -1)


@pytest.mark.parametrize(
    "override,words",
    [
        ("algo.old_logprobs=cached", "algo.old_logprobs"),  # a closed choice: fails at composition
        ("algo.length_bucket_tokens=-1", "algo.length_bucket_tokens"),
    ],
)
def test_bad_scoring_options_fail_at_start(compose_cfg, override, words):
    from hydra.errors import ConfigCompositionException

    with pytest.raises((ValueError, ConfigCompositionException), match=words):
        validate(compose_cfg(override))


def test_sampled_old_logprobs_need_float32_scoring(compose_cfg):
    validate(compose_cfg("algo.old_logprobs=sampled"))  # float32, autocast auto (off on CPU): fine
    for override in ("model.autocast=bf16", "model.dtype=bfloat16"):
        with pytest.raises(ValueError, match="float32"):
            validate(compose_cfg("algo.old_logprobs=sampled", override))
