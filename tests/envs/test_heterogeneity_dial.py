"""planted_subseq's ``expert_heterogeneity``: a mixture of progress experts whose spread is a dial
(issue 20). None keeps the old traces (pinned by hash); a number h draws, per trace, an extreme
expert (slow or fast) with probability h, else the medium one, and failed chunk j holds the gold's
first k_j = min(L - 1, k_0 + j) digits."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import gymnasium
import numpy as np
import pytest

import envs

LEVELS = (0.0, 0.5, 1.0)


def make(**kwargs):
    return gymnasium.make(envs.ENV_IDS["planted_subseq"], **kwargs).unwrapped


def digits_of(episode: str, marker: str) -> str:
    """The chunk of an episode: its text after the answer marker, if it commits."""
    return episode.split(marker, 1)[1].strip() if marker in episode else episode


def progress_of(chunk: str, gold: str) -> int:
    """Hand check of a failed chunk: the number k of leading gold digits it keeps, asserting that each
    of the first len(gold) digits from k on is the gold's shifted by +1 (so not the gold's)."""
    head = chunk[: len(gold)]
    k = 0
    while k < len(gold) and head[k] == gold[k]:
        k += 1
    assert k < len(gold), (chunk, gold)
    for i in range(k, len(gold)):
        assert int(head[i]) == (int(gold[i]) + 1) % 10 and head[i] != gold[i], (chunk, gold, i)
    return k


# Traces of the code before expert_heterogeneity existed (captured from it): both feedback details,
# retry off/on, 20 problems, n_failed 0..3, variety 0 / 0.3 / 1, one rng of seed 11 per env.
UNCHANGED_SHA256 = "f27ef2e176d26e5cf8606a0b62ab965f670485ae53e7d19afbd1e2aa49edd290"


@pytest.mark.parametrize("explicit", [False, True])
def test_none_keeps_the_traces_byte_identical(explicit):
    traces = []
    extra = {"expert_heterogeneity": None} if explicit else {}
    for detail in ("verdict", "digits"):
        for retry in (False, True):
            env = make(max_episodes=4, feedback=True, feedback_detail=detail, retry_wrong_answers=retry, **extra)
            rng = np.random.default_rng(11)
            for index in range(20):
                env.reset(options={"index": index})
                for n_failed in range(4):
                    for variety in (0.0, 0.3, 1.0):
                        traces.append(env.expert_trace(rng, n_failed=n_failed, variety=variety))
    assert len(traces) == 960
    assert hashlib.sha256(json.dumps(traces).encode()).hexdigest() == UNCHANGED_SHA256


@pytest.mark.parametrize("h", LEVELS)
@pytest.mark.parametrize("retry,feedback", [(False, False), (False, True), (True, True)])
def test_progress_traces_replay_to_success_and_make_the_stated_progress(h, retry, feedback):
    env = make(max_episodes=4, feedback=feedback, retry_wrong_answers=retry, expert_heterogeneity=h)
    replay = make(max_episodes=4, feedback=feedback, retry_wrong_answers=retry, expert_heterogeneity=h)
    marker = env.answer_marker
    rng = np.random.default_rng(3)
    for index in range(40):
        for n_failed in range(4):
            for variety in (0.0, 0.5, 1.0):
                env.reset(options={"index": index})
                gold = env.reference_answer
                trace = env.expert_trace(rng, n_failed=n_failed, variety=variety)
                assert len(trace) == n_failed + 1
                # failed chunks: no gold, the first k_j gold digits kept, k_j = min(L - 1, k_0 + j)
                ks = [progress_of(digits_of(e, marker), gold) for e in trace[:-1]]
                for j, (episode, k) in enumerate(zip(trace[:-1], ks)):
                    assert gold not in episode
                    assert episode.startswith(marker) == retry
                    assert len(digits_of(episode, marker)) == env.chunk_length
                    assert k == min(len(gold) - 1, ks[0] + j)
                assert trace[-1].startswith(f"{marker} ") and gold in trace[-1]
                if variety == 0.0:
                    assert trace[-1] == f"{marker} {gold}" + "0" * (env.chunk_length - len(gold))
                # the environment agrees: reward 1.0 at the last episode only
                replay.reset(options={"index": index})
                for i, episode in enumerate(trace):
                    _, reward, done, _, _ = replay.step(episode)
                    assert done == (i == len(trace) - 1) and reward == (1.0 if done else 0.0), (trace, i)


def test_filler_that_would_complete_the_gold_is_replaced():
    """gold "10", k = 0: "21" + "00" would hold "10" at offset 1; the filler becomes another digit."""
    env = make(gold_length=2, chunk_length=4, input_length=4, expert_heterogeneity=0.5)
    index = next(i for i in range(5000) if (env.reset(options={"index": i}) and env.reference_answer == "10"))
    env.reset(options={"index": index})
    assert env.progress_miss(0) == "2111" and env.progress_miss(1) == "1111"
    with pytest.raises(ValueError, match="right must be in"):
        env.progress_miss(2)


def k0_sample(h: float, gold_length: int, n: int = 3000, seed: int = 0) -> np.ndarray:
    """k_0 of n traces (n_failed >= 1), read from each trace's first failed chunk by hand."""
    env = make(gold_length=gold_length, chunk_length=gold_length + 1, max_episodes=3, expert_heterogeneity=h)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        env.reset(options={"index": i % 200})
        trace = env.expert_trace(rng, n_failed=1 + i % 2, variety=0.5)
        out.append(progress_of(trace[0], env.reference_answer))
    return np.array(out)


def test_the_share_of_extreme_experts_is_h_and_the_mean_progress_does_not_move():
    variances = []
    for h in LEVELS:
        k0 = k0_sample(h, gold_length=3)
        extreme = np.isin(k0, (0, 2)).mean()  # L = 3: slow 0, medium 1, fast 2
        assert abs(extreme - h) < 0.04, (h, extreme)
        if h > 0:
            slow = (k0 == 0).sum() / max(1, np.isin(k0, (0, 2)).sum())
            assert abs(slow - 0.5) < 0.05  # slow and fast at equal odds
        assert abs(k0.mean() - 1.0) < 0.05, (h, k0.mean())  # E[k_0] = (L - 1) / 2 = 1 for every h
        assert abs(k0.var() - h) < 0.06, (h, k0.var())  # Var[k_0] = h ((L - 1) / 2)^2
        variances.append(k0.var())
    assert variances[0] == 0.0 and variances[0] < variances[1] < variances[2]


def test_even_gold_length_keeps_the_mean_with_a_split_medium():
    variances = []
    for h in LEVELS:
        k0 = k0_sample(h, gold_length=4)
        assert set(np.unique(k0)) <= ({1, 2} if h == 0 else {0, 1, 2, 3} if h < 1 else {0, 3})
        assert abs(k0.mean() - 1.5) < 0.08, (h, k0.mean())
        assert abs(k0.var() - (h * 2.25 + (1 - h) * 0.25)) < 0.12, (h, k0.var())
        variances.append(k0.var())
    assert variances[0] < variances[1] < variances[2]


def test_progress_traces_are_deterministic_and_traces_without_failed_chunks_are_the_old_ones():
    for h in LEVELS:
        env = make(max_episodes=3, expert_heterogeneity=h)
        old = make(max_episodes=3)
        for index in range(10):
            env.reset(options={"index": index})
            old.reset(options={"index": index})
            for seed in range(5):
                a = env.expert_trace(np.random.default_rng(seed), n_failed=2, variety=0.5)
                assert a == env.expert_trace(np.random.default_rng(seed), n_failed=2, variety=0.5)
                new0 = env.expert_trace(np.random.default_rng(seed), n_failed=0, variety=0.5)
                assert new0 == old.expert_trace(np.random.default_rng(seed), n_failed=0, variety=0.5)
    # the expert takes two uniforms: u1 < h makes it extreme, u2 picks slow / fast (or medium's k_0)
    env = make(expert_heterogeneity=0.5)
    env.reset(options={"index": 0})
    rng, twin = np.random.default_rng(9), np.random.default_rng(9)
    name, k0 = env.progress_expert(rng)
    u1, u2 = twin.random(), twin.random()
    assert name == ("medium" if u1 >= 0.5 else "fast" if u2 >= 0.5 else "slow")
    assert k0 == {"slow": 0, "medium": 1, "fast": 2}[name] and rng.random() == twin.random()


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "0.5", True])
def test_a_bad_level_is_an_error(bad):
    with pytest.raises(ValueError, match="expert_heterogeneity"):
        make(expert_heterogeneity=bad)


def test_digits_feedback_with_a_level_is_an_error_naming_both():
    with pytest.raises(ValueError, match="expert_heterogeneity.*feedback_detail='digits'"):
        make(feedback=True, feedback_detail="digits", expert_heterogeneity=0.5)
    make(feedback=True, feedback_detail="digits", expert_heterogeneity=None)  # the default is fine


def test_the_config_reaches_the_env_and_validates():
    from metarl_llm.runtime.setup import compose_config, env_factory

    cfg = compose_config(["env=planted_subseq", "env.expert_heterogeneity=0.5"])
    cfg.validate()
    assert env_factory(cfg)("train").unwrapped.expert_heterogeneity == 0.5
    assert env_factory(compose_config(["env=planted_subseq"]))("train").unwrapped.expert_heterogeneity is None
    for overrides, match in [
        (["env.expert_heterogeneity=1.5"], r"env.expert_heterogeneity must be null or in \[0, 1\]"),
        (["env.expert_heterogeneity=0.5", "env.feedback_detail=digits"], "env.expert_heterogeneity=0.5.*feedback_detail"),
    ]:
        with pytest.raises(ValueError, match=match):
            compose_config(["env=planted_subseq", *overrides]).validate()


def test_the_warm_start_cache_key_is_unchanged_by_the_default_and_moved_by_a_level():
    """Entries written before the option existed stay valid: the default is left out of the key."""
    from metarl_llm.config import PlantedSubseqEnvConfig
    from metarl_llm.runtime.setup import compose_config
    from metarl_llm.sft.warm_start import LATER_ENV_OPTIONS, cache_key

    assert LATER_ENV_OPTIONS["expert_heterogeneity"] is None
    c = compose_config(["env=planted_subseq"])
    fields = [(f.name, f.type, dataclasses.field(default=getattr(c.env, f.name))) for f in dataclasses.fields(c.env)]
    Before = dataclasses.make_dataclass("Before", [f for f in fields if f[0] != "expert_heterogeneity"])
    before = Before(**{k: v for k, v in dataclasses.asdict(c.env).items() if k != "expert_heterogeneity"})
    key = cache_key(c.model, c.env, c.budget, c.warm_start, 0, {"a": 0})
    assert cache_key(c.model, before, c.budget, c.warm_start, 0, {"a": 0}) == key
    keys = {key}
    for h in LEVELS:
        env = dataclasses.replace(c.env, expert_heterogeneity=h)
        assert isinstance(env, PlantedSubseqEnvConfig)
        keys.add(cache_key(c.model, env, c.budget, c.warm_start, 0, {"a": 0}))
    assert len(keys) == 4


# ------------------------------------------------------------------ expert_pace="length"


@pytest.mark.parametrize("max_episodes,m", [(3, 1), (4, 1), (5, 2)])
@pytest.mark.parametrize("h", LEVELS)
def test_length_pace_sets_the_number_of_failed_chunks_by_the_expert(h, max_episodes, m):
    """The expert of each trace is read from a twin of the generator (two uniforms, as
    progress_expert draws them); its failed chunks number fast 0, medium m, slow 2m, whatever
    n_failed was passed, and the trace replays to success at its last episode only."""
    env = make(max_episodes=max_episodes, expert_heterogeneity=h, expert_pace="length")
    replay = make(max_episodes=max_episodes, expert_heterogeneity=h, expert_pace="length")
    marker = env.answer_marker
    for seed in range(60):
        index = seed % 20
        env.reset(options={"index": index})
        gold = env.reference_answer
        twin = np.random.default_rng(seed)
        u1, u2 = twin.random(), twin.random()
        expert = ("fast" if u2 >= 0.5 else "slow") if u1 < h else "medium"
        trace = env.expert_trace(np.random.default_rng(seed), n_failed=seed % max_episodes, variety=0.5)
        assert len(trace) - 1 == {"fast": 0, "medium": m, "slow": 2 * m}[expert], (expert, trace)
        k0 = {"slow": 0, "medium": 1, "fast": 2}[expert]  # gold_length 3
        for j, episode in enumerate(trace[:-1]):
            assert progress_of(episode, gold) == min(len(gold) - 1, k0 + j)
        assert trace[-1].startswith(f"{marker} ") and gold in trace[-1]
        replay.reset(options={"index": index})
        for i, episode in enumerate(trace):
            _, reward, done, _, _ = replay.step(episode)
            assert done == (i == len(trace) - 1) and reward == (1.0 if done else 0.0), (trace, i)


def test_length_pace_keeps_the_mean_length_and_spreads_it_with_h():
    """Over 3000 traces per level (max_episodes 5: m = 2): the mean number of failed chunks is m at
    every h, its variance h m^2 (0 at h = 0: every trace answers after exactly m failed chunks)."""
    variances = []
    for h in LEVELS:
        env = make(max_episodes=5, expert_heterogeneity=h, expert_pace="length")
        rng = np.random.default_rng(0)
        counts = []
        for i in range(3000):
            env.reset(options={"index": i % 200})
            counts.append(len(env.expert_trace(rng, n_failed=0, variety=0.5)) - 1)
        counts = np.array(counts)
        assert abs(counts.mean() - 2.0) < 0.1, (h, counts.mean())
        assert abs(counts.var() - 4.0 * h) < 0.25, (h, counts.var())
        if h == 0:
            assert set(counts.tolist()) == {2}
        variances.append(counts.var())
    assert variances[0] < variances[1] < variances[2]


def test_progress_pace_is_the_default_and_leaves_the_traces_as_they_were():
    for h in LEVELS:
        a, b = make(max_episodes=4, expert_heterogeneity=h), make(max_episodes=4, expert_heterogeneity=h, expert_pace="progress")
        assert a.expert_pace == "progress"
        for index in range(10):
            a.reset(options={"index": index})
            b.reset(options={"index": index})
            for n_failed in range(4):
                assert a.expert_trace(np.random.default_rng(index), n_failed, 0.5) == b.expert_trace(
                    np.random.default_rng(index), n_failed, 0.5
                )


def test_length_pace_errors_name_what_is_missing():
    with pytest.raises(ValueError, match="expert_pace='length'.*expert_heterogeneity, which is None"):
        make(expert_pace="length")
    with pytest.raises(ValueError, match="needs max_episodes >= 3.*got 2"):
        make(max_episodes=2, expert_heterogeneity=0.5, expert_pace="length")
    with pytest.raises(ValueError, match=r"expert_pace='speed'; expected one of \['progress', 'length'\]"):
        make(expert_heterogeneity=0.5, expert_pace="speed")
    from metarl_llm.runtime.setup import compose_config, env_factory

    with pytest.raises(ValueError, match="env.expert_pace=length.*env.expert_heterogeneity, which is null"):
        compose_config(["env=planted_subseq", "env.expert_pace=length"]).validate()
    cfg = compose_config(["env=planted_subseq", "env.expert_heterogeneity=0.5", "env.expert_pace=length"])
    cfg.validate()
    assert env_factory(cfg)("train").unwrapped.expert_pace == "length"


def test_the_warm_start_cache_key_is_unchanged_by_the_default_pace_and_moved_by_length():
    from metarl_llm.runtime.setup import compose_config
    from metarl_llm.sft.warm_start import cache_key

    c = compose_config(["env=planted_subseq", "env.expert_heterogeneity=0.5"])
    fields = [(f.name, f.type, dataclasses.field(default=getattr(c.env, f.name))) for f in dataclasses.fields(c.env)]
    Before = dataclasses.make_dataclass("Before", [f for f in fields if f[0] != "expert_pace"])
    before = Before(**{k: v for k, v in dataclasses.asdict(c.env).items() if k != "expert_pace"})
    key = cache_key(c.model, c.env, c.budget, c.warm_start, 0, {"a": 0})
    assert cache_key(c.model, before, c.budget, c.warm_start, 0, {"a": 0}) == key
    paced = dataclasses.replace(c.env, expert_pace="length")
    assert cache_key(c.model, paced, c.budget, c.warm_start, 0, {"a": 0}) != key
