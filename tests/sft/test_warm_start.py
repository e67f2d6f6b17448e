"""Warm start: policy-token-only loss, the cache, and a clean model handed back."""

import copy

import pytest
import torch

from metarl_llm.config import BudgetConfig
from metarl_llm.core.trial import StreamCodec
from metarl_llm.models import build_char_tokenizer, load_policy
from metarl_llm.runtime.setup import env_factory
from metarl_llm.sft.fit import FitResult, fit_records
from metarl_llm.sft.warm_start import expert_records, warm_start

SMALL = [
    "warm_start.steps=4",
    "warm_start.num_traces=32",
    "warm_start.batch_size=8",
    "model.tiny.hidden_size=32",
    "model.tiny.num_layers=1",
    "model.tiny.num_heads=2",
    "model.tiny.intermediate_size=64",
]


def test_expert_records_mask_only_policy_tokens(compose_cfg):
    cfg = compose_cfg("env.feedback=true")  # feedback inserts observation tokens between episodes
    tok = build_char_tokenizer()
    codec = StreamCodec(tok, "\n", "Answer:")
    recs = expert_records(env_factory(cfg), codec, cfg.budget, 20, 2, 0.5, seed=0)
    for r in recs:
        text_policy = tok.decode([i for i, m in zip(r["input_ids"], r["completion_mask"]) if m])
        text_other = tok.decode([i for i, m in zip(r["input_ids"], r["completion_mask"]) if not m])
        assert "Answer:" in text_policy and r["input_ids"][-1] == tok.eos_token_id and r["completion_mask"][-1] == 1
        assert "[correct]" not in text_policy and "[wrong]" not in text_policy  # observations never trained on
        assert text_other.split("\n")[0].isdigit()  # the prompt is masked
    assert any("[wrong]" in tok.decode(r["input_ids"]) for r in recs)


def test_a_blind_experts_failed_trials_are_trained_on_with_the_forced_answer_as_policy_tokens(compose_cfg, monkeypatch):
    """env=inverse: its default expert does not know the gold, and its trials that spend the budget
    end with the forced answer, a guess. The warm start keeps them (a filter on success would tell
    the policy the gold); the forced-answer text is an observation, the guess a policy token."""
    cfg = compose_cfg("env=inverse")
    tok = build_char_tokenizer()
    codec = StreamCodec(tok, "\n", "Answer:")
    make_env = env_factory(cfg)
    recs = expert_records(make_env, codec, cfg.budget, 60, 2, 1.0, seed=0)
    assert len(recs) == 60  # none dropped
    forced = 0
    for r in recs:
        policy = tok.decode([i for i, m in zip(r["input_ids"], r["completion_mask"]) if m])
        other = tok.decode([i for i, m in zip(r["input_ids"], r["completion_mask"]) if not m])
        episodes = policy.split("\n")
        if len(episodes) == 4:  # three checks failed: "Answer:" inserted, then the guess and EOS
            forced += 1
            assert other.endswith("Answer:") and all(e.endswith(" no") for e in episodes[:3])
            assert episodes[3].lstrip(" ").rstrip(tok.eos_token).isdigit()
        else:
            assert "Answer:" in episodes[-1] and not other.endswith("Answer:")
    # a budget of 3 checks spends itself on 7 of 10 problems (a blind search): 42 of 60 expected
    assert 30 <= forced <= 52, forced
    # An expert that knows the gold must succeed: a failing trace of it is an error, not a record.
    from envs.inverse import InverseEnv

    def failing(self, rng, n_failed, variety):  # three failed checks, then a wrong guess
        wrong = [x for x in range(10) if str(x) != self.reference_answer]
        return [f"{self.check_text(x)} no" for x in wrong[:3]] + [f" {wrong[3]}"]

    monkeypatch.setattr(InverseEnv, "expert_trace", failing)
    with pytest.raises(RuntimeError, match="did not succeed"):
        expert_records(
            env_factory(compose_cfg("env=inverse", "env.expert_search=informed")), codec, cfg.budget, 5, 2, 1.0, seed=0
        )
    assert len(expert_records(make_env, codec, cfg.budget, 5, 2, 1.0, seed=0)) == 5  # the blind expert's may fail


@pytest.mark.parametrize("hidden", [0, 1])
def test_retry_traces_never_end_the_stream_the_policy_cannot_know_is_done(compose_cfg, hidden):
    """With retry_wrong_answers only the environment's grade ends a trial, so every attempt of a
    trace, the right one too, ends with the delimiter: an EOS would teach the policy to stop after
    an attempt whose grade it has not seen (after a wrong one the rollout goes on past it). Without
    retries the trace still ends with EOS."""
    tok = build_char_tokenizer()
    codec = StreamCodec(tok, "\n", "Answer:")
    retry = ["env.feedback=true", "env.feedback_detail=digits", "env.retry_wrong_answers=true", f"env.hidden_digits={hidden}"]
    for overrides, closes in [(retry, False), (["env.feedback=true"], True)]:
        cfg = compose_cfg(*overrides)
        recs = expert_records(env_factory(cfg), codec, cfg.budget, 30, 2, 0.5, seed=0)
        attempts = 0
        for r in recs:
            policy = [i for i, m in zip(r["input_ids"], r["completion_mask"]) if m]
            assert (policy[-1] == tok.eos_token_id) == closes and r["completion_mask"][-1] == 1
            assert policy.count(tok.eos_token_id) == int(closes)  # never an EOS before the last token
            episodes = tok.decode(policy).split("\n")
            attempts += len([e for e in episodes if e])
            # each attempt is followed by the delimiter, the last one too without EOS
            assert tok.decode(policy).endswith("\n") != closes
        assert attempts > len(recs)  # traces with failed attempts were among them


def test_expert_traces_that_do_not_fit_the_budget_are_an_error(compose_cfg):
    cfg = compose_cfg()
    codec = StreamCodec(build_char_tokenizer(), "\n", "Answer:")
    with pytest.raises(ValueError, match="max_episode_tokens"):
        expert_records(env_factory(cfg), codec, BudgetConfig(max_episode_tokens=5), 4, 1, 0.0, seed=0)
    with pytest.raises(ValueError, match="max_episodes"):
        expert_records(env_factory(cfg), codec, BudgetConfig(max_episodes=2), 4, 2, 0.0, seed=0)


def test_warm_start_is_cached_and_returns_a_clean_model(compose_cfg, tmp_path):
    cfg = compose_cfg(*SMALL, f"warm_start.cache_dir={tmp_path}")
    x = torch.tensor([[5, 6, 7, 8, 9, 10]])

    def run():
        policy, tok = load_policy(cfg.model, 0)
        codec = StreamCodec(tok, "\n", "Answer:")
        return warm_start(policy, tok, codec, env_factory(cfg), cfg.model, cfg.env, cfg.budget, cfg.warm_start, 0)

    fresh, info = run()
    cached, info2 = run()
    assert info["warm_start/cached"] is False and info2["warm_start/cached"] is True
    with torch.no_grad():
        assert torch.equal(fresh(x).logits, cached(x).logits)  # fresh and cached runs start alike
        for model in (fresh, cached):
            # A deepcopy (the frozen reference) must not follow later changes of the policy.
            ref = copy.deepcopy(model)
            before = ref(x).logits.clone()
            for p in model.parameters():
                p.add_(0.05)
            assert torch.equal(ref(x).logits, before)
            assert not torch.allclose(model(x).logits, before)


def test_warm_start_seed_fixes_one_start_model_for_several_run_seeds(compose_cfg, tmp_path):
    """warm_start.seed=0 makes runs with seeds 0 and 1 share one warm start (one cache entry);
    warm_start.seed=null (the default) gives each run seed its own."""
    from metarl_llm.config import WarmStartConfig
    from metarl_llm.sft.warm_start import cache_key
    from metarl_llm.trainer import train

    cfg = compose_cfg()
    vocab = build_char_tokenizer().get_vocab()
    key = lambda ws, seed: cache_key(cfg.model, cfg.env, cfg.budget, ws, seed, vocab)  # noqa: E731
    assert key(WarmStartConfig(seed=0), 3) == key(WarmStartConfig(), 3)  # the effective seed is the argument
    assert key(WarmStartConfig(), 3) != key(WarmStartConfig(), 4)

    tiny = [
        *SMALL,
        "algo.iterations=1",
        "algo.problems_per_iter=2",
        "algo.group_size=2",
        "algo.minibatch_size=4",
        "eval.num_problems=2",
        "eval.samples_per_problem=1",
        "eval.extrapolation=false",
        "eval.adaptation=false",
        "checkpoint_every=0",
        "logger.mode=disabled",
        "logger.progress_bar=false",
        f"warm_start.cache_dir={tmp_path / 'cache'}",
    ]
    summaries = [train(compose_cfg(*tiny, "warm_start.seed=0", f"seed={s}"), tmp_path / f"run{s}") for s in (0, 1)]
    assert [s["warm_start_cached"] for s in summaries] == [False, True]
    assert len(list((tmp_path / "cache").iterdir())) == 1


@pytest.mark.parametrize("replay", [0.0, 0.25])
def test_varied_phase_replays_a_share_of_the_focused_traces(compose_cfg, tmp_path, monkeypatch, replay):
    """The second phase fits the varied traces plus round(num_traces * replay_fraction) of the
    first phase's focused traces (the replay that keeps the first phase's rule learned)."""
    calls = []
    recording_fit = lambda model, tok, recs, steps, *a, **k: calls.append((recs, steps)) or FitResult([0.0], steps)  # noqa: E731
    cfg = compose_cfg(
        *SMALL,
        "warm_start.num_traces=40",
        f"warm_start.replay_fraction={replay}",
        "warm_start.focused_until_loss=0",
        f"warm_start.cache_dir={tmp_path}",
    )
    policy, tok = load_policy(cfg.model, 0)
    codec = StreamCodec(tok, "\n", "Answer:")
    warm_start(policy, tok, codec, env_factory(cfg), cfg.model, cfg.env, cfg.budget, cfg.warm_start, 0, fit=recording_fit)
    (focused, steps1), (second, steps2) = calls
    assert (steps1, steps2) == (2, 2) and len(focused) == len(second) == 40
    key = lambda r: tuple(r["input_ids"])  # noqa: E731
    n_replay = int(round(40 * replay))
    assert [key(r) for r in second[40 - n_replay :]] == [key(r) for r in focused[:n_replay]]
    longest_focused = max(sum(r["completion_mask"]) for r in focused)  # the answer episode alone
    assert sum(sum(r["completion_mask"]) > longest_focused for r in second[: 40 - n_replay]) > 10  # failed episodes first


def test_focused_phase_runs_on_until_its_loss_is_below_the_level(compose_cfg, tmp_path, monkeypatch):
    """The focused phase is asked for focused_max_multiple x its share of steps, stopping at the
    first logged loss below focused_until_loss after its share; the steps it ran are recorded."""
    calls = []

    def fake_fit(model, tok, recs, steps, *a, stop_below=None, min_steps=0, **k):
        calls.append((steps, stop_below, min_steps))
        return FitResult([0.5] * 7 + [0.05], 80) if stop_below is not None else FitResult([0.9], steps)  # stops at step 80

    cfg = compose_cfg(*SMALL, "warm_start.steps=60", "warm_start.focused_until_loss=0.1", f"warm_start.cache_dir={tmp_path}")
    policy, tok = load_policy(cfg.model, 0)
    _, info = warm_start(
        policy,
        tok,
        StreamCodec(tok, "\n", "Answer:"),
        env_factory(cfg),
        cfg.model,
        cfg.env,
        cfg.budget,
        cfg.warm_start,
        0,
        fit=fake_fit,
    )
    assert calls == [(120, 0.1, 30), (30, None, 0)]  # 30 focused steps, up to 4x; then the 30 varied ones
    assert info["warm_start/focused_steps"] == 80 and info["warm_start/steps"] == 110


def test_sft_fit_stops_below_a_loss_level_after_min_steps(compose_cfg):
    """stop_below ends training at the first 10-step logged loss under the level, not before min_steps."""
    cfg = compose_cfg(*SMALL)
    policy, tok = load_policy(cfg.model, 0)
    recs = expert_records(env_factory(cfg), StreamCodec(tok, "\n", "Answer:"), cfg.budget, 16, 0, 0.0, seed=0)
    result = fit_records(policy, tok, recs, 60, 4, 1e-3, 0, "constant_with_warmup", stop_below=100.0, min_steps=20)
    assert result.steps == 20 and len(result.losses) == 2  # logged at steps 10 and 20 (each below 100): stopped at 20 of 60
    result = fit_records(policy, tok, recs, 30, 4, 1e-3, 0, "constant_with_warmup", stop_below=1e-6, min_steps=20)
    assert result.steps == 30 and len(result.losses) == 3  # never below the level: runs to the bound


def test_blind_expert_records_are_the_tokens_a_rollout_of_the_same_episodes_makes():
    """A blind expert's trial, forced answer included, tokenised by trace_record equals the stream the
    rollout builds when it samples the same episodes (feedback and retries on and off)."""
    import itertools

    import numpy as np

    from envs.inverse import InverseEnv
    from metarl_llm.rollout.base import finish_episode, start_trials
    from metarl_llm.sft.traces import closes_trials, trace_record

    tok = build_char_tokenizer()
    budget = BudgetConfig(max_episodes=3, max_episode_tokens=32, max_total_tokens=96, answer_max_tokens=12)
    codec = StreamCodec(tok, "\n", "Answer:")
    forced = 0
    for feedback, retry in itertools.product((False, True), (False, True)):
        env = InverseEnv(max_episodes=3, feedback=feedback, retry_wrong_answers=retry)
        rng = np.random.default_rng(0)
        for i in range(20):
            env.reset(options={"index": i})
            episodes = env.expert_trace(rng, 0, 0.5)
            prompt, info = env.reset(options={"index": i})
            rec = trace_record(env, codec, budget, prompt, info["problem_id"], episodes, "expert", require_success=False)
            [t] = start_trials(codec, [env], [{"options": {"index": i}}], [0], budget)
            forcing = False
            for tokens, _ in codec.trace_generations(episodes, close=closes_trials(env)):
                done, forcing, obs = finish_episode(t, env, codec, tokens, [0.0] * len(tokens), forcing, budget)
                if done:
                    break
                if obs:
                    t.append(obs, False, -1)
            forced += t.forced
            assert list(t.ids) == rec["input_ids"] and [int(a) for a in t.action] == rec["completion_mask"], episodes
    assert forced > 20  # the forced answers were exercised


def test_a_blind_experts_forced_answer_has_the_answer_budget_and_no_share_of_the_total(compose_cfg):
    """As the rollout samples it: budget.answer_max_tokens bounds the forced answer, and
    budget.max_total_tokens counts the policy tokens before it."""
    from dataclasses import replace

    from envs.inverse import InverseEnv
    from metarl_llm.sft.traces import trace_record
    from metarl_llm.sft.warm_start import TraceNeeds

    tok = build_char_tokenizer()
    codec = StreamCodec(tok, "\n", "Answer:")
    env = InverseEnv(max_episodes=1)
    prompt, info = env.reset(options={"index": 0})
    wrong = next(x for x in range(10) if str(x) != env.reference_answer)
    guess = next(x for x in range(10) if x != wrong)
    episodes = [f"{env.check_text(wrong)} no", f" {guess}"]  # one failed check, then the forced guess
    check = len(episodes[0]) + 1  # characters and the delimiter
    budget = BudgetConfig(max_episodes=1, max_episode_tokens=32, max_total_tokens=check, answer_max_tokens=3)
    rec = trace_record(env, codec, budget, prompt, info["problem_id"], episodes, "expert", require_success=False)
    assert sum(rec["completion_mask"]) == check + 3  # the guess: a space, a digit, EOS; not counted in the total
    needs = TraceNeeds()
    needs.add(codec, prompt, episodes, forced=True)
    assert (needs.episode, needs.total) == (check, check) and not needs.too_small(budget)
    env.reset(options={"index": 0})
    # the guess and its stop token fit answer_max_tokens = 2 (a rollout's answer cut at the limit
    # replays with one stop token more), not 1
    assert trace_record(env, codec, replace(budget, answer_max_tokens=2), prompt, info["problem_id"], episodes, "e", False)
    env.reset(options={"index": 0})
    with pytest.raises(
        ValueError, match=r"forced answer ' \d' of problem .* has 3 tokens; budget.answer_max_tokens=1 is too small"
    ):
        trace_record(env, codec, replace(budget, answer_max_tokens=1), prompt, info["problem_id"], episodes, "expert", False)
    cfg = compose_cfg("env=inverse", "budget.max_episodes=1")  # n_failed_max=2 > 0: not used by a blind expert
    assert len(expert_records(env_factory(cfg), codec, cfg.budget, 20, 2, 1.0, seed=0)) == 20


def test_a_blind_expert_with_a_rule_that_segments_after_generation_is_refused(compose_cfg):
    cfg = compose_cfg("env=inverse", "segment=paragraph")
    from metarl_llm.jobs.common import stream_codec

    codec = stream_codec(cfg, build_char_tokenizer())
    with pytest.raises(ValueError, match=r"segment=paragraph.*use segment=delimiter.*env.expert_search=informed"):
        expert_records(env_factory(cfg), codec, cfg.budget, 8, 2, 1.0, seed=0)


def test_written_comparisons_need_a_fitted_budget_and_say_which(compose_cfg):
    """env.write_comparison's checks are longer than the default budget's 32-token episode: the warm
    start refuses the default budget naming the smallest that fits, and budget=fit derives it."""
    tok = build_char_tokenizer()
    codec = StreamCodec(tok, "\n", "Answer:")
    cfg = compose_cfg("env=inverse", "env.write_comparison=true")
    with pytest.raises(
        ValueError, match=r"max_episode_tokens=32 is too small .* smallest budget that fits them is budget.max_episode_tokens=36 "
    ):
        expert_records(env_factory(cfg), codec, cfg.budget, 40, 2, 1.0, seed=0)
    from metarl_llm.sft.warm_start import fitted_budget

    fit = compose_cfg("env=inverse", "env.write_comparison=true", "budget=fit")
    budget = fitted_budget(env_factory(fit), codec, fit.budget, fit.warm_start, seed=0)
    assert budget.max_episode_tokens >= 36  # 35 characters and the delimiter
    recs = expert_records(env_factory(fit), codec, budget, 40, 2, 1.0, seed=0)
    assert len(recs) == 40 and all(" vs " in tok.decode(r["input_ids"]) for r in recs)


def test_warm_start_max_episodes_trains_on_searches_longer_than_the_runs_budget(compose_cfg, tmp_path):
    """warm_start.max_episodes: the expert traces come from trials of that many episodes (a blind
    search's fourth and later checks), while the run keeps budget.max_episodes; budget=fit fits the
    token limits to those traces."""
    from dataclasses import replace

    import torch

    from metarl_llm.jobs.common import base_policy, warm_start_budget

    run = compose_cfg("env=inverse")
    assert warm_start_budget(run) is run.budget
    cfg = compose_cfg("env=inverse", "warm_start.max_episodes=8", "budget.max_total_tokens=400")
    ws_budget = warm_start_budget(cfg)
    assert (ws_budget.max_episodes, ws_budget.max_total_tokens, cfg.budget.max_episodes) == (8, 400, 3)
    tok = build_char_tokenizer()
    codec = StreamCodec(tok, "\n", "Answer:")
    recs = expert_records(env_factory(replace(cfg, budget=ws_budget)), codec, ws_budget, 200, 2, 1.0, seed=0)
    failed_checks = [tok.decode(r["input_ids"]).count(" no\n") for r in recs]
    # a blind search of up to 8 checks: 4 or more fail before the commit in about half the trials
    assert max(failed_checks) == 8 and sum(n > 3 for n in failed_checks) > 60, failed_checks
    with pytest.raises(ValueError, match="warm_start.max_episodes must be >= 1"):
        compose_cfg("warm_start.max_episodes=0").validate()  # as every job does first
    with pytest.raises(ValueError, match="segment=paragraph cuts episodes after generation .* use segment=delimiter"):
        warm_start_budget(compose_cfg("env=math", "segment=paragraph", "warm_start.max_episodes=8"))
    assert warm_start_budget(compose_cfg("env=math", "segment=paragraph", "warm_start.max_episodes=3")).max_episodes == 3

    fit = compose_cfg(
        "env=inverse",
        "warm_start.max_episodes=8",
        "budget=fit",
        "warm_start.steps=1",
        "warm_start.num_traces=64",
        "warm_start.batch_size=8",
        f"warm_start.cache_dir={tmp_path}",
    )
    _, _, _, make_env, info = base_policy(fit, torch.device("cpu"))
    assert fit.budget.max_episodes == 3 and make_env("train").unwrapped.max_episodes == 3  # PPO's budget
    assert info["budget/max_total_tokens"] > 3 * 32  # fitted to traces of up to 8 checks and a guess
    plain = compose_cfg(
        "env=inverse",
        "budget=fit",
        "warm_start.steps=1",
        "warm_start.num_traces=64",
        "warm_start.batch_size=8",
        f"warm_start.cache_dir={tmp_path}",
    )
    assert base_policy(plain, torch.device("cpu"))[4]["warm_start/key"] != info["warm_start/key"]
