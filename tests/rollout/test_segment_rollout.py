"""Episode rules that cut a trial after it is generated (segment=paragraph|markers|chunks) through
the rollout engines and the warm start's traces: the episodes are the rule's cut of the kept
tokens, the tokens after a committing (or answer-forcing) episode are dropped exactly as if
generation had stopped there, and every engine gives the same trials."""

import gymnasium as gym
import pytest
import torch

import envs  # noqa: F401
from metarl_llm.config import BudgetConfig, SegmentConfig
from metarl_llm.core.trial import StreamCodec
from metarl_llm.rollout.engine import run_trials
from metarl_llm.sft.traces import trace_record

BUDGET = BudgetConfig(max_episodes=3, max_episode_tokens=4, max_total_tokens=30, answer_max_tokens=5)
N = 24


def play(model, codec, engine, marker="e", n=N):
    made = [gym.make("metarl/PlantedSubseq-v0", max_episodes=BUDGET.max_episodes, answer_marker=marker) for _ in range(n)]
    return run_trials(
        model, codec, made, [{"seed": i} for i in range(n)], list(range(n)), BUDGET, engine=engine, keys=torch.arange(n) * 7919
    )


def episodes_of(t):
    """(start, end) stream positions of each episode of ``t`` (ends exclusive)."""
    out = []
    for j in range(len(t.episode_texts)):
        pos = [k for k, e in enumerate(t.episode) if e == j]
        out.append((pos[0], pos[-1] + 1))
    return out


@pytest.fixture(scope="module")
def chunked(char_policy):
    model, codec = char_policy
    return model, StreamCodec(codec.tokenizer, "\n", "Answer:", segment=SegmentConfig(name="chunks", chunk_tokens=5))


@pytest.mark.usefixtures("one_thread")
def test_chunks_cut_after_generation_and_drop_what_follows_the_ending_episode(chunked):
    model, codec = chunked
    trials = play(model, codec, "cached")
    committed_early = forced_early = 0
    for t in trials:
        spans = episodes_of(t)
        thinking = spans if not t.forced else spans[:-1]
        # the episodes the rule cut: 5 tokens each (the last thinking one may be shorter), adjacent
        assert all(b - a == 5 for a, b in thinking[:-1]) and 1 <= thinking[-1][1] - thinking[-1][0] <= 5
        assert all(b == c for (_, b), (c, _) in zip(thinking, thinking[1:]))
        assert t.episode_ends == [b - 1 for _, b in spans]
        assert t.policy_tokens <= BUDGET.max_total_tokens + BUDGET.answer_max_tokens
        if t.forced:  # forced after max_episodes chunks, an EOS or the whole budget: the forced text, then the answer
            ended_on_eos = t.ids[thinking[-1][1] - 1] == codec.eos_id
            assert len(thinking) == BUDGET.max_episodes or ended_on_eos or thinking[-1][1] - thinking[0][0] == 30
            gap = t.ids[thinking[-1][1] : spans[-1][0]]
            assert gap[-len(codec.forced_ids) :] == codec.forced_ids
            forced_early += len(thinking) == BUDGET.max_episodes and thinking[-1][1] - thinking[0][0] < 30
        else:  # the last kept episode committed: it holds the marker, no earlier one does, nothing follows it
            assert "e" in t.episode_texts[-1] and not any("e" in x for x in t.episode_texts[:-1])
            assert spans[-1][1] == len(t.ids)
            committed_early += t.policy_tokens < 30
        assert len(t.sample_logprobs) == len(t.ids)
    assert committed_early and forced_early  # both kinds of truncation were exercised


@pytest.mark.usefixtures("one_thread")
def test_every_engine_gives_the_same_segmented_trials(chunked):
    model, codec = chunked
    cached = play(model, codec, "cached", n=12)
    for engine in ("reencode", "hf_generate"):
        other = play(model, codec, engine, n=12)
        if engine == "hf_generate":  # generate draws its own random numbers: the trials have the rule's structure
            for t in other:
                spans = episodes_of(t)
                thinking = spans if not t.forced else spans[:-1]
                assert all(b - a == 5 for a, b in thinking[:-1]) and t.episode_ends == [b - 1 for _, b in spans]
                assert len(thinking) <= BUDGET.max_episodes and t.policy_tokens <= 30 + BUDGET.answer_max_tokens
            continue
        for a, b in zip(cached, other):
            assert a.ids == b.ids and a.action == b.action and a.episode == b.episode and a.outcome == b.outcome
            assert torch.allclose(torch.tensor(a.sample_logprobs), torch.tensor(b.sample_logprobs), atol=1e-5)


def test_the_kept_tokens_are_a_prefix_of_what_was_sampled(chunked):
    """Counter-based draws: a trial whose tail was dropped holds exactly the first tokens of the
    uncut generation with the same key (a budget that no episode ends early)."""
    model, codec = chunked
    long = StreamCodec(codec.tokenizer, "\n", "Answer:", segment=SegmentConfig(name="chunks", chunk_tokens=30))
    cut = play(model, codec, "cached", marker="\x00", n=6)  # no commit: each trial forced after 3 chunks
    whole = play(model, long, "cached", marker="\x00", n=6)  # one chunk of the whole budget, then forced
    for a, b in zip(cut, whole):
        first = episodes_of(a)[0][0]
        assert a.forced and b.forced
        kept = [i for i, e in zip(a.ids, a.episode) if 0 <= e < len(a.episode_texts) - 1]  # all but the forced answer
        sampled = [i for i, e in zip(b.ids, b.episode) if e == 0]
        assert kept == sampled[: len(kept)] and a.ids[:first] == b.ids[:first]
        assert len(kept) == 15 or kept[-1] == codec.eos_id  # three chunks, or an EOS before


def test_feedback_with_a_rule_that_cuts_after_is_refused(compose_cfg, char_policy):
    with pytest.raises(ValueError, match="env.feedback=true needs segment=delimiter"):
        from metarl_llm.jobs.common import validate

        validate(compose_cfg("env=math", "segment=paragraph", "env.feedback=true"))
    model, codec = char_policy
    para = StreamCodec(codec.tokenizer, "\n", "Answer:", segment=SegmentConfig(name="chunks", chunk_tokens=3))
    env = gym.make("metarl/Math-v0", max_episodes=5, feedback=True)
    with pytest.raises(ValueError, match="cuts episodes after the trial is generated"):
        run_trials(model, para, [env], [{"seed": 0}], [0], BUDGET, keys=torch.tensor([1]))


def test_markers_traces_play_as_the_rule_cuts_them(qwen_tokenizer):
    """An expert trace on Qwen3's vocabulary with the markers rule: its episodes are joined by a blank
    line and "Wait, ", the rule cuts them back apart, and the environment commits at the last."""
    codec = StreamCodec(qwen_tokenizer, "\n", "Answer:", segment=SegmentConfig(name="markers"), max_episodes=3)
    env = gym.make("metarl/Math-v0", max_episodes=3).unwrapped
    prompt, info = env.reset(seed=3)
    import numpy as np

    episodes = env.expert_trace(np.random.default_rng(0), n_failed=2, variety=0.0)
    [(tokens, texts)] = codec.trace_generations(episodes)
    assert [x.strip() for x in texts] == [episodes[0]] + [f"Wait, {e}" for e in episodes[1:]]
    assert tokens[-1] == codec.eos_id
    env.reset(seed=3)
    record = trace_record(env, codec, BudgetConfig(max_total_tokens=200), prompt, info["problem_id"], episodes, "expert")
    assert record is not None and sum(record["completion_mask"]) == len(tokens)
    assert record["input_ids"][-len(tokens) :] == tokens


def test_the_r1_configuration_commits_at_the_think_block_and_grades_boxed_answers(compose_cfg):
    from metarl_llm.jobs.common import validate
    from metarl_llm.runtime.setup import env_factory

    cfg = compose_cfg("model=r1", "segment=markers", "budget=large", "env=math")
    validate(cfg)
    env = env_factory(cfg)("train").unwrapped
    assert env.answer_marker == "</think>" and env.forced_answer_text.rstrip().endswith("</think>")
    env.reset(options={"index": 0})
    ref = env.reference_answer
    assert env.step("Let me add them.")[2] is False  # thinking: no commit
    obs, reward, terminated, _, info = env.step(f"Wait, check it again.\n</think>\n\nThe answer is $\\boxed{{{ref}}}$.")
    assert terminated and reward == 1.0 and info["answer"] == f"The answer is $\\boxed{{{ref}}}$."
    env.reset(options={"index": 0})
    env.force_answer()  # out of budget: MRT's text was inserted, the whole next episode is the answer
    assert env.step(f"\\boxed{{{ref}}}")[1] == 1.0
