"""Rollout engines: the cached engine reproduces a from-scratch recomputation exactly.

The reference below plays each trial alone, with no KV cache and no padding: one full
forward pass over the whole stream per sampled token, the draw taken from the same
counter-based uniform u(trial key, stream position). The cached engine (one batched
cache kept across episodes, observations appended, trials stepping independently) must
produce the same tokens and the same log-probs.
"""

import gymnasium as gym
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import envs  # noqa: F401
from metarl_llm.config import BudgetConfig, RolloutConfig, TinyModelConfig
from metarl_llm.core.batch import length_buckets
from metarl_llm.core.trial import StreamCodec
from metarl_llm.models import build_char_tokenizer, build_tiny_model
from metarl_llm.rollout.base import finish_episode, start_trials
from metarl_llm.rollout.cached import CachedEngine
from metarl_llm.rollout.decode import DecodeBatch
from metarl_llm.rollout.engine import engine_from_config, get_engine, run_trials
from metarl_llm.rollout.kv_cache import growing_cache
from metarl_llm.rollout.meta_prover import boundary_prefixes, meta_prover_context, meta_prover_success
from metarl_llm.rollout.sampling import draw_tokens, sample, stream_uniforms, trial_keys

# Four episodes before the forced answer; the total budget cuts some trials earlier.
BUDGET = BudgetConfig(max_episodes=4, max_episode_tokens=9, max_total_tokens=30, answer_max_tokens=6)


@pytest.fixture(scope="module")
def setup():
    tok = build_char_tokenizer()
    model = build_tiny_model(
        TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64), len(tok), tok.pad_token_id, 0
    ).eval()
    return model, StreamCodec(tok, "\n", "Answer:")


PLANTED, MATH = "metarl/PlantedSubseq-v0", "metarl/Math-v0"  # math: prompts of 8 and ~63 tokens (word problems)


def make_envs(n, budget=BUDGET, env_id=PLANTED):
    return [gym.make(env_id, max_episodes=budget.max_episodes) for _ in range(n)]


def resets_of(n):
    return [{"seed": 100 + i // 2} for i in range(n)], [i // 2 for i in range(n)]


def play(model, codec, engine, n=10, seed=0, budget=BUDGET, env_id=PLANTED, **kw):
    resets, groups = resets_of(n)
    return run_trials(
        model,
        codec,
        make_envs(n, budget, env_id),
        resets,
        groups,
        budget,
        torch.Generator().manual_seed(seed),
        engine=engine,
        **kw,
    )


@torch.no_grad()
def reference_trials(model, codec, n=10, seed=0, budget=BUDGET, env_id=PLANTED):
    """Each trial alone, no cache, no padding: a full forward pass per sampled token."""
    resets, groups = resets_of(n)
    env_list = make_envs(n, budget, env_id)
    trials = start_trials(codec, env_list, resets, groups, budget)
    keys = trial_keys(n, torch.Generator().manual_seed(seed))
    stops = set(codec.stop_ids.tolist())
    for i, t in enumerate(trials):
        forced = False
        for _episode in range(budget.max_episodes + 2):
            limit = (
                budget.answer_max_tokens
                if forced
                else max(1, min(budget.max_episode_tokens, budget.max_total_tokens - t.policy_tokens))
            )
            toks, lps = [], []
            while len(toks) < limit:
                stream = t.ids + toks
                logits = model(input_ids=torch.tensor([stream])).logits[:, -1]
                u = stream_uniforms(keys[i : i + 1], torch.tensor([len(stream)]))
                tok, lp = draw_tokens(logits, u)
                toks.append(int(tok))
                lps.append(float(lp))
                if toks[-1] in stops:
                    break
            done, forced, obs = finish_episode(t, env_list[i], codec, toks, lps, forced, budget)
            if done:
                break
            t.append(obs, False, -1)
        else:
            raise AssertionError("reference trial did not end")
    return trials


def assert_same_trials(a, b, atol=1e-5):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.ids == y.ids and x.action == y.action and x.episode == y.episode
        assert x.episode_texts == y.episode_texts and x.outcome == y.outcome and x.forced == y.forced
        np.testing.assert_allclose(x.sample_logprobs, y.sample_logprobs, atol=atol, rtol=0)


def test_cached_engine_equals_a_recomputation_from_scratch(setup, one_thread):
    model, codec = setup
    cached = play(model, codec, "cached")
    ref = reference_trials(model, codec)
    assert_same_trials(cached, ref)
    # The setting is really multi-episode: several trials run 4 episodes plus a forced answer.
    assert max(len(t.episode_texts) for t in cached) == BUDGET.max_episodes + 1
    assert any(t.forced for t in cached) and len({len(t.ids) for t in cached}) > 3


def test_prompts_of_different_lengths_are_prefilled_in_groups_and_match_a_recomputation(setup, one_thread):
    model, codec = setup
    trials = play(model, codec, "cached", n=12, env_id=MATH)
    prompt_lengths = {t.action.index(1) for t in trials}  # tokens before the first sampled one
    assert min(prompt_lengths) < 10 and max(prompt_lengths) > 50  # short and long prompts in one batch
    assert_same_trials(trials, reference_trials(model, codec, n=12, env_id=MATH))
    assert_same_trials(trials, play(model, codec, CachedEngine(bucket_tokens=0), n=12, env_id=MATH))  # one prefill pass


def test_grouped_prefill_gives_the_cache_and_logits_of_one_pass(setup, one_thread):
    model, codec = setup
    g = torch.Generator().manual_seed(3)
    contexts = [torch.randint(3, 90, (n,), generator=g).tolist() for n in (3, 21, 4, 19, 5, 20, 2)]
    with torch.no_grad():
        one, grouped = DecodeBatch(model, torch.device("cpu"), 7), DecodeBatch(model, torch.device("cpu"), 7)
        a = one.feed(contexts, codec.pad_id)
        b = grouped.prefill(contexts, codec.pad_id, bucket_tokens=8)
        assert length_buckets([len(c) for c in contexts], 8).__len__() > 1  # really several passes
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
        assert torch.equal(one.mask, grouped.mask) and torch.equal(one.next_pos, grouped.next_pos)
        cols = one.mask.bool()
        for la, lb in zip(one.cache.layers, grouped.cache.layers):
            for x, y in ((la.keys, lb.keys), (la.values, lb.values)):
                torch.testing.assert_close(y.transpose(1, 2)[cols], x.transpose(1, 2)[cols], atol=1e-5, rtol=0)
        nxt = torch.randint(3, 90, (7, 1), generator=g)  # the caches continue alike
        torch.testing.assert_close(grouped.feed(nxt, codec.pad_id), one.feed(nxt, codec.pad_id), atol=1e-5, rtol=0)
        obs = [[5, 6, 7], [8], [9, 10], [11], [12, 13, 14, 15], [16], [17]]  # and so do blocks of different widths
        torch.testing.assert_close(grouped.feed(obs, codec.pad_id), one.feed(obs, codec.pad_id), atol=1e-5, rtol=0)
        assert grouped.cache.get_seq_length() == grouped.width == one.width == 21 + 1 + 4


def test_growing_cache_keeps_the_numbers_of_a_concatenating_one(setup, one_thread):
    from transformers import DynamicCache

    model, codec = setup
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 90, (3, 6), generator=g)
    with torch.no_grad():
        outs = []
        for cache in (growing_cache(model, capacity=2), DynamicCache(config=model.config)):
            o = model(input_ids=ids, cache=cache, use_cache=True)
            steps = [o.logits[:, -1]]
            for _ in range(5):  # capacity 2 < 6 + 5 columns: the buffers grow (doubling) on the way
                o = model(input_ids=steps[-1].argmax(-1, keepdim=True), cache=o.cache, use_cache=True)
                steps.append(o.logits[:, -1])
            outs.append((torch.stack(steps), o.cache))
        (a, ca), (b, cb) = outs
        assert torch.equal(a, b) and ca.get_seq_length() == cb.get_seq_length() == 11
        ca.batch_select_indices(torch.tensor([2, 0]))
        cb.batch_select_indices(torch.tensor([2, 0]))
        for la, lb in zip(ca.layers, cb.layers):
            assert torch.equal(la.keys, lb.keys) and torch.equal(la.values, lb.values)


def test_engines_agree_and_trials_do_not_depend_on_the_batch(setup, one_thread):
    model, codec = setup
    cached = play(model, codec, "cached")
    assert_same_trials(cached, play(model, codec, "reencode"))
    # Chunked into batches of 3 rows: the same trials.
    resets, groups = resets_of(10)
    chunked = get_engine("cached", max_rows=3).run_trials(
        model, codec, make_envs(10), resets, groups, BUDGET, torch.Generator().manual_seed(0)
    )
    assert_same_trials(cached, chunked)
    # Observations queued one token per pass (default) or fed as blocks: the same trials.
    assert_same_trials(cached, play(model, codec, CachedEngine(queue_tokens=0)))
    # Another seed, other trials.
    assert [t.ids for t in play(model, codec, "cached", seed=1)] != [t.ids for t in cached]


def test_hf_generate_engine_plays_valid_trials(setup, one_thread):
    model, codec = setup
    trials = play(model, codec, "hf_generate")
    for t in trials:
        ids = torch.tensor([t.ids])
        lp = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
        act = torch.tensor(t.action[1:], dtype=torch.bool)
        assert torch.allclose(lp[act], torch.tensor(t.sample_logprobs[1:])[act], atol=1e-4)
        assert 1 <= len(t.episode_texts) <= BUDGET.max_episodes + 1 and t.answer_episode == len(t.episode_texts) - 1


def test_kept_cache_covers_the_stream_and_continues_like_a_fresh_prefill(setup, one_thread):
    model, codec = setup
    trials = play(model, codec, "cached", keep_cache=True)
    for t in trials:
        assert t.cache is not None and t.cache.length == len(t.ids) - 1 and t.cache.computed_by(model)
    ends = [boundary_prefixes(t) for t in trials]
    suffixes = [[codec.forced_prefix(t.ids[:e]) for e in es] for t, es in zip(trials, ends)]
    toks, lengths, owners = CachedEngine(max_rows=7).continue_prefixes(
        model, trials, ends, suffixes, 2, BUDGET.answer_max_tokens, codec.stop_ids, codec.pad_id, greedy=True
    )
    contexts = [meta_prover_context(codec, trials[i], ends[i][b]) for i, b in owners]
    fresh = sample(model, contexts, BUDGET.answer_max_tokens, codec.stop_ids, codec.pad_id, greedy=True)
    assert len(owners) == 2 * sum(len(e) for e in ends) > 20
    for r in range(len(owners)):
        assert toks[r, : lengths[r]].tolist() == fresh.tokens[r, : fresh.lengths[r]].tolist()


def test_sampled_continuations_depend_on_the_keys_only(setup, one_thread):
    """With the same keys, the meta-prover's sampled answers are the same whether they continue the
    kept caches or re-encode every prefix (the base Engine method), on any engine, and whatever
    the chunking (max_rows) and prefill bucketing: each row draws at u(its key, stream position)."""
    model, codec = setup
    trials = play(model, codec, "cached", keep_cache=True)
    ends = [boundary_prefixes(t) for t in trials]
    suffixes = [[codec.forced_prefix(t.ids[:e]) for e in es] for t, es in zip(trials, ends)]
    m = 3 * sum(len(e) for e in ends)
    keys = trial_keys(m, torch.Generator().manual_seed(5))
    args = (model, trials, ends, suffixes, 3, BUDGET.answer_max_tokens, codec.stop_ids, codec.pad_id)
    runs = [
        CachedEngine().continue_prefixes(*args, keys=keys),
        CachedEngine(max_rows=5, bucket_tokens=0).continue_prefixes(*args, keys=keys),
        get_engine("reencode", max_rows=4).continue_prefixes(*args, keys=keys),
        get_engine("hf_generate").continue_prefixes(*args, keys=keys),
    ]
    rows = lambda toks, lengths: [toks[r, : lengths[r]].tolist() for r in range(m)]  # noqa: E731
    reference = rows(*runs[0][:2])
    assert len(set(map(tuple, reference))) > 5  # sampled, not all alike
    for toks, lengths, owners in runs[1:]:
        assert rows(toks, lengths) == reference and owners == runs[0][2]


def test_meta_prover_uses_the_cache_only_for_its_own_model(setup, one_thread):
    """J from the kept caches equals J re-encoded (same generator, so the same answer keys), for the
    model that computed the caches; for another model the caches are not used (its J with and
    without them is the same)."""
    model, codec = setup
    trials = play(model, codec, "cached", keep_cache=True)
    ends = [boundary_prefixes(t) for t in trials]
    kept = [t.cache for t in trials]

    def j_of(m, with_cache):
        for t, c in zip(trials, kept):
            t.cache = c if with_cache else None
        return meta_prover_success(m, codec, trials, ends, 3, BUDGET.answer_max_tokens, torch.Generator().manual_seed(0))

    j = j_of(model, True)
    assert [len(x) for x in j] == [len(e) for e in ends] and all(((x >= 0) & (x <= 1)).all() for x in j)
    assert all(np.array_equal(a, b) for a, b in zip(j, j_of(model, False)))
    other = build_tiny_model(
        TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64), model.config.vocab_size, codec.pad_id, 1
    ).eval()
    j_other = j_of(other, True)
    assert all(np.array_equal(a, b) for a, b in zip(j_other, j_of(other, False)))


def test_stream_uniforms_are_deterministic_and_uniform():
    keys = torch.arange(2000).repeat_interleave(50)
    pos = torch.arange(50).repeat(2000)
    u = stream_uniforms(keys, pos)
    assert u.dtype == torch.float64 and bool(((u > 0) & (u < 1)).all())
    assert torch.equal(u, stream_uniforms(keys, pos))
    assert len(torch.unique(u)) == len(u)
    counts = torch.histc(u.float(), bins=10, min=0, max=1)
    expected = len(u) / 10
    assert float(((counts - expected) ** 2 / expected).sum()) < 27.9  # chi-square, 9 dof, p = 0.001


def test_draw_tokens_follows_the_softmax():
    logits = torch.tensor([[2.0, 0.0, -1.0, 1.0]]).repeat(40000, 1)
    u = stream_uniforms(torch.full((40000,), 7), torch.arange(40000))
    tok, lp = draw_tokens(logits, u)
    p = F.softmax(logits[0], -1)
    freq = torch.bincount(tok, minlength=4).float() / len(tok)
    assert torch.allclose(freq, p, atol=0.01)
    assert torch.allclose(lp, torch.log(p)[tok], atol=1e-6)
    greedy, _ = draw_tokens(torch.tensor([[0.0, 3.0, 3.0]]), None)
    assert greedy.tolist() == [1]


def test_the_blocked_draw_of_a_large_vocabulary_is_the_same_inverse_cdf():
    """V > SMALL_VOCAB: the block-then-id CDF picks the same ids as one float64 CDF of the row (the
    sums differ only in order: an id can differ only where u falls within rounding of a boundary,
    never here), with the same log-probs; greedy is the argmax; rows of one call are independent."""
    from metarl_llm.rollout import sampling

    g = torch.Generator().manual_seed(0)
    v = 20_000  # 20 blocks, the last one partly padding
    logits = torch.randn(64, v, generator=g) * 3
    logits[5, 19_999] = 30.0  # nearly all mass on the very last id
    u = stream_uniforms(torch.arange(64), torch.arange(64))
    tok, lp = sampling._draw_blocked(logits, u)
    logp = F.log_softmax(logits, -1)
    cdf = logp.double().exp().cumsum(-1)
    want = torch.searchsorted(cdf, (u.double() * cdf[:, -1])[:, None]).squeeze(-1).clamp(max=v - 1)
    assert tok.tolist() == want.tolist() and tok[5] == 19_999
    assert torch.allclose(lp, logp.gather(-1, want[:, None]).squeeze(-1), atol=2e-5)
    assert torch.equal(sampling._draw_blocked(logits, None)[0], logits.argmax(-1))
    assert torch.equal(draw_tokens(logits, u)[0], tok)  # draw_tokens takes this path above SMALL_VOCAB
    assert sampling._draw_blocked(logits[10:12], u[10:12])[0].tolist() == tok[10:12].tolist()


def test_bad_engine_names_and_options_are_errors():
    with pytest.raises(ValueError, match="rollout.engine='vllm'"):
        get_engine("vllm")
    with pytest.raises(ValueError, match="rollout.max_rows"):
        engine_from_config(RolloutConfig(max_rows=0))
    with pytest.raises(ValueError, match="rollout.prefill_bucket_tokens"):
        engine_from_config(RolloutConfig(prefill_bucket_tokens=-1))
    assert engine_from_config(RolloutConfig(prefill_bucket_tokens=64)).bucket_tokens == 64


def test_a_kept_cache_belongs_to_the_model_object_that_computed_it():
    """TrialCache holds its model weakly: another model (even of the same weights) is not its
    model, and once its model is freed no model is, whatever id() the next one gets."""
    import gc
    import weakref

    from metarl_llm.rollout.kv_cache import TrialCache

    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    b.load_state_dict(a.state_dict())
    cache = TrialCache([torch.zeros(1, 3, 2)], [torch.zeros(1, 3, 2)], weakref.ref(a))
    assert cache.computed_by(a) and not cache.computed_by(b) and cache.length == 3
    del a
    gc.collect()
    assert not any(cache.computed_by(torch.nn.Linear(2, 2)) for _ in range(20))
    assert not TrialCache([torch.zeros(1, 1, 2)], [torch.zeros(1, 1, 2)]).computed_by(b)


def test_a_finished_trial_keeps_grading_its_own_problem_after_its_env_is_reset(setup, one_thread):
    """Trials hold their problem's grader, not the environment: resetting the pool to other problems
    (as the next rollout does) changes neither what a finished trial's grader scores nor its reference."""
    model, codec = setup
    envs_ = make_envs(4)
    resets, groups = resets_of(4)
    trials = run_trials(model, codec, envs_, resets, groups, BUDGET, torch.Generator().manual_seed(0))
    before = [
        (
            t.grader.reference_answer,
            t.grader.score(t.grader.reference_answer),
            t.grader.score("999"),
            [t.grader.forced_outcome(t.episode_texts[:1], " " + t.grader.reference_answer)],
        )
        for t in trials
    ]
    for i, env in enumerate(envs_):
        env.reset(seed=900 + i)  # other problems
    assert any(env.unwrapped.problem.reference != t.grader.reference_answer for env, t in zip(envs_, trials))
    after = [
        (
            t.grader.reference_answer,
            t.grader.score(t.grader.reference_answer),
            t.grader.score("999"),
            [t.grader.forced_outcome(t.episode_texts[:1], " " + t.grader.reference_answer)],
        )
        for t in trials
    ]
    assert after == before and all(b[1] == 1.0 and b[3] == [1.0] for b in before)
    assert all(t.grader.problem.problem_id == t.problem_id for t in trials)
    assert not hasattr(trials[0].grader, "step") and not hasattr(trials[0].grader, "reset")
