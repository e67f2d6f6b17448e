"""Trained verifiers: metric functions by hand, examples of a hand-built trial, training
on a learnable signal, one-pass prefix scores, save/load, the J-estimator plug-in,
best-of-N, the job=train_verifier entry point and bad input."""

import dataclasses
import json

import gymnasium as gym
import numpy as np
import pytest
import torch

import envs  # noqa: F401
from metarl_llm.config import BonusConfig, BudgetConfig, TinyModelConfig
from metarl_llm.core.trial import StreamCodec, Trial
from metarl_llm.evaluation.curves import maj_at_k
from metarl_llm.models import build_char_tokenizer, build_tiny_model
from metarl_llm.rl.bonus import episode_bonuses
from metarl_llm.rollout.engine import heldout_resets, run_trials
from metarl_llm.rollout.meta_prover import JOptions, boundary_prefixes
from metarl_llm.verify.best_of_n import best_of_n, best_of_n_trials
from metarl_llm.verify.calibration import (
    auroc,
    brier,
    evaluate_verifier,
    example_logits,
    expected_calibration_error,
    verifier_metrics,
    within_problem_auroc,
)
from metarl_llm.verify.data import VerifierExamples, ranking_pairs, verifier_examples
from metarl_llm.verify.model import build_verifier, check_same_vocabulary, is_saved_verifier, load_verifier
from metarl_llm.verify.scoring import score_prefixes, score_trials, trained_verifier_estimator
from metarl_llm.verify.train import VerifierConfig, draw_pairs, run_verifier_training, train_verifier
from tests.support import ROOT

BUDGET = BudgetConfig(max_episodes=3, max_episode_tokens=8, max_total_tokens=20, answer_max_tokens=6)
TINY = TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
ENV = "metarl/PlantedSubseq-v0"


@pytest.fixture(scope="module")
def setup():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest and leaves the other cores alone
    tok = build_char_tokenizer()
    policy = build_tiny_model(
        TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64), len(tok), tok.pad_token_id, 0
    ).eval()
    codec = StreamCodec(tok, "\n", "Answer:")
    yield policy, codec
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trials(setup):
    """Held-out trials of the tiny policy: 6 problems x 3 trials, problem-major."""
    policy, codec = setup
    resets, groups = heldout_resets(6, 3)
    env_list = [gym.make(ENV, split="test", max_episodes=BUDGET.max_episodes) for _ in resets]
    return run_trials(policy, codec, env_list, resets, groups, BUDGET, torch.Generator().manual_seed(0))


def random_head_verifier(tok, seed=0):
    """A tiny verifier with a random (non-zero) head, so that scores differ between positions."""
    v = build_verifier(tok, tiny=TINY, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.nn.init.normal_(v.head.weight, std=1.0)
    return v.eval()


# ------------------------------------------------------------------ metrics


def test_brier_ece_auroc_by_hand():
    p = [0.05, 0.15, 0.12, 0.95, 0.85, 1.0]
    y = [0, 1, 0, 1, 1, 1]
    assert brier(p, y) == pytest.approx((0.05**2 + 0.85**2 + 0.12**2 + 0.05**2 + 0.15**2 + 0) / 6)
    # bins: 0 -> {.05: y 0}, 1 -> {.15: 1, .12: 0}, 8 -> {.85: 1}, 9 -> {.95: 1, 1.0: 1} (the last bin is closed)
    want = (1 * 0.05 + 2 * abs(0.5 - 0.135) + 1 * 0.15 + 2 * abs(1 - 0.975)) / 6
    assert expected_calibration_error(p, y) == pytest.approx(want)
    assert expected_calibration_error([0.3, 0.3], [0, 1]) == pytest.approx(0.2)  # one bin, acc .5, conf .3
    # positives {.4, .8}, negatives {.1, .4}: pairs 1 + 1/2 (tie) + 1 + 1 of 4
    assert auroc([0.1, 0.4, 0.4, 0.8], [0, 0, 1, 1]) == pytest.approx(3.5 / 4)
    assert auroc([3, 2, 1], [1, 0, 0]) == 1.0 and auroc([1, 2, 3], [1, 0, 0]) == 0.0
    assert auroc([5, 5, 5, 5], [1, 0, 1, 0]) == 0.5
    assert np.isnan(auroc([0.1, 0.9], [1, 1])) and np.isnan(auroc([0.1, 0.9], [0, 0]))


def test_auroc_equals_pairwise_count_on_random_data():
    rng = np.random.default_rng(0)
    for n in (2, 7, 40, 200):
        s = np.round(rng.normal(size=n), 1)  # rounded: many ties
        y = rng.integers(0, 2, size=n)
        y[:2] = [0, 1]
        pos, neg = s[y == 1], s[y == 0]
        pairs = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
        assert auroc(s, y) == pytest.approx(pairs / (len(pos) * len(neg)), abs=1e-12)


def test_within_problem_auroc_ranks_each_problems_trials_apart():
    # problem 0 ranks right (1.0), problem 1 wrong (0.0), problem 2 has only successes (left out)
    scores, labels, groups = [0.9, 0.8, 0.1, 0.2, 0.5, 0.6], [1, 0, 1, 0, 1, 1], [0, 0, 1, 1, 2, 2]
    assert within_problem_auroc(scores, labels, groups) == (0.5, 2)
    assert auroc(scores, labels) == pytest.approx(4 / 8)  # pooled: 4 of the 8 pairs ordered right
    # a verifier that only tells the easy problem from the hard one: pooled 6/9, within 0.5
    scores, labels, groups = [0.9, 0.9, 0.9, 0.1, 0.1, 0.1], [1, 1, 0, 1, 0, 0], [0, 0, 0, 1, 1, 1]
    assert auroc(scores, labels) == pytest.approx(6 / 9)
    assert within_problem_auroc(scores, labels, groups) == (0.5, 2)
    value, mixed = within_problem_auroc([0.1, 0.2], [1, 1], ["a", "b"])
    assert np.isnan(value) and mixed == 0
    with pytest.raises(ValueError, match="groups must have the shape"):
        within_problem_auroc([0.1, 0.2], [1, 0], [0])


def test_verifier_metrics_by_hand():
    m = verifier_metrics([0.0, 2.0, -1.0], [1, 1, 0])
    assert m["accuracy"] == 1.0  # p >= 0.5 counts as a positive prediction
    assert m["bce"] == pytest.approx((np.log(2) + np.log1p(np.exp(-2)) + np.log1p(np.exp(-1))) / 3)
    assert m["positive_rate"] == pytest.approx(2 / 3) and m["predicted_positive_rate"] == pytest.approx(2 / 3)
    assert m["auroc"] == 1.0 and m["count"] == 3


# --------------------------------------------------------------------- data


def hand_built_trial(tok, outcome):
    """prompt "ab\\n" | ep 0 "cd\\n" | feedback "[x]\\n" | ep 1 "e\\n" | forced "Answer:" | answer ep 2 " 12"."""
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    t = Trial(problem_id="hand", group=0)
    t.append(enc("ab\n"), False, -1)  # positions 0-2
    t.append(enc("cd\n"), True, 0)  # 3-5
    t.append(enc("[x]\n"), False, -1)  # 6-9
    t.append(enc("e\n"), True, 1)  # 10-11
    t.append(enc("Answer:"), False, -1)  # 12-18
    t.append(enc(" 12"), True, 2)  # 19-21
    t.answer_episode, t.answer, t.outcome, t.forced = 2, "12", outcome, True
    return t


def test_examples_of_a_hand_built_trial(setup):
    _, codec = setup
    tok = codec.tokenizer
    graded, solved = hand_built_trial(tok, 0.5), hand_built_trial(tok, 1.0)
    # after the prompt; after episode 0 and the feedback to it; after episode 1 (before the forced text)
    assert boundary_prefixes(graded) == [3, 10, 12]
    ex = verifier_examples([graded, solved], codec, prefixes=True)
    assert ex.streams[0] is graded.ids and ex.streams[1] is solved.ids  # the trials' own tokens, not re-tokenised
    np.testing.assert_array_equal(ex.stream, [0, 0, 0, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(ex.position, [2, 9, 11, 21, 2, 9, 11, 21])  # each prefix's last token, then the end
    np.testing.assert_array_equal(ex.label, [0, 0, 0, 0, 1, 1, 1, 1])  # graded 0.5 < 1 is a failure
    np.testing.assert_array_equal(ex.at_end, [False, False, False, True] * 2)
    newline = tok.encode("\n", add_special_tokens=False)[0]
    assert [graded.ids[p] for p in ex.position[:3]] == [newline] * 3  # boundaries end on the delimiter
    assert ex.pad_id == codec.pad_id and len(ex) == 8
    ends_only = verifier_examples([graded, solved], codec, prefixes=False)
    np.testing.assert_array_equal(ends_only.position, [21, 21])
    np.testing.assert_array_equal(ends_only.label, [0, 1])
    assert ends_only.at_end.all()


def synthetic_trials(tok, n, seed):
    """Random digit trials; the outcome is 1 iff a policy episode holds the digit 7 (about half)."""
    rng = np.random.default_rng(seed)
    digits = lambda k: "".join(rng.choice(list("0123456789"), k))  # noqa: E731
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    out = []
    for i in range(n):
        t = Trial(problem_id=f"synthetic{i}", group=i)
        e0, e1 = digits(3), digits(3)
        t.append(enc(digits(3) + "\n"), False, -1)
        t.append(enc(e0 + "\n"), True, 0)
        t.append(enc(e1), True, 1)
        t.answer_episode, t.answer, t.outcome = 1, e1, float("7" in e0 + e1)
        out.append(t)
    return out


def test_verifier_learns_a_token_presence_signal_and_is_deterministic(setup):
    _, codec = setup
    tok = codec.tokenizer
    train_ex = verifier_examples(synthetic_trials(tok, 512, 0), codec, prefixes=False)
    held_ex = verifier_examples(synthetic_trials(tok, 256, 1), codec, prefixes=False)
    logged = []
    v = build_verifier(tok, tiny=TINY, seed=0)
    m = train_verifier(
        v,
        train_ex,
        held_ex,
        steps=40,
        batch_size=32,
        lr=1e-2,
        generator=torch.Generator().manual_seed(0),
        log=lambda metrics, step: logged.append((step, metrics)),
        eval_every=20,
        log_every=10,
    )
    base = max(m["heldout/positive_rate"], 1 - m["heldout/positive_rate"])
    assert 0.4 < m["heldout/positive_rate"] < 0.6
    assert m["heldout/accuracy"] > base + 0.25
    assert m["heldout/auroc"] > 0.9 and m["heldout/ece"] < 0.15
    assert [s for s, x in logged if "train/loss" in x] == [10, 20, 30, 40]
    assert [s for s, x in logged if "heldout/accuracy" in x] == [20, 40]
    assert evaluate_verifier(v, held_ex)["accuracy"] == m["heldout/accuracy"]
    # seeded: the same generator and initial weights give the same verifier
    again = build_verifier(tok, tiny=TINY, seed=0)
    m2 = train_verifier(again, train_ex, held_ex, steps=40, batch_size=32, lr=1e-2, generator=torch.Generator().manual_seed(0))
    assert all(m2[k] == m[k] for k in m if k.startswith("heldout/"))


def test_ranking_pairs_and_their_draws_pair_one_problems_success_and_failure():
    ex = VerifierExamples(
        streams=[[1, 2]] * 8,
        stream=np.arange(8),
        position=np.ones(8, dtype=np.int64),
        label=np.array([1, 0, 1, 1, 1, 0, 1, 0], dtype=np.float32),
        at_end=np.array([1, 1, 1, 1, 1, 0, 1, 1], dtype=bool),
        pad_id=0,
        group=np.array([0, 0, 0, 1, 1, 1, 2, 2]),
    )
    pos, neg = ranking_pairs(ex)  # problem 1's only failure is a prefix: no whole-trial pair
    assert [p.tolist() for p in pos] == [[0, 2], [6]] and [n.tolist() for n in neg] == [[1], [7]]
    drawn = draw_pairs((pos, neg), 400, torch.Generator().manual_seed(0))
    win, lose = drawn[:400], drawn[400:]
    assert set(win.tolist()) == {0, 2, 6} and set(lose.tolist()) == {1, 7}
    assert all((w in (0, 2)) == (f == 1) for w, f in zip(win, lose))  # both ends of a pair from one problem
    assert 0.4 < np.mean(lose == 1) < 0.6 and 0.4 < np.mean(win[lose == 1] == 0) < 0.6  # uniform draws
    with pytest.raises(ValueError, match="no training problem has both a successful and a failed trial"):
        ranking_pairs(dataclasses.replace(ex, label=np.ones(8, dtype=np.float32)))
    with pytest.raises(ValueError, match="carry no problem ids"):
        ranking_pairs(dataclasses.replace(ex, group=None))


def test_the_pair_loss_is_the_bradley_terry_loss_of_the_drawn_pairs(setup):
    _, codec = setup
    trials = synthetic_trials(codec.tokenizer, 16, 0)
    for i, t in enumerate(trials):
        t.group = i // 4  # 4 problems of 4 trials
    ex = verifier_examples(trials, codec, prefixes=False)
    v = build_verifier(codec.tokenizer, tiny=TINY, seed=0)
    z = torch.as_tensor(example_logits(v, ex))  # the weights the first step's loss is taken at
    logged = []
    train_verifier(
        v, ex, None, steps=1, batch_size=8, lr=1e-3, generator=torch.Generator().manual_seed(0),
        log=lambda m, step: logged.append(m), log_every=1, pair_weight=0.5,
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    batch = torch.randperm(16, generator=g)[:8]  # the BCE batch, then the pairs, from one generator
    drawn = torch.as_tensor(draw_pairs(ranking_pairs(ex), 2, g))
    pair = torch.nn.functional.softplus(z[drawn[2:]] - z[drawn[:2]]).mean()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(z[batch], torch.as_tensor(ex.label)[batch].double())
    assert logged[0]["train/pair_loss"] == pytest.approx(pair.item(), abs=1e-5)
    assert logged[0]["train/loss"] == pytest.approx(bce.item() + 0.5 * pair.item(), abs=1e-5)
    with pytest.raises(ValueError, match="pair_weight must be >= 0"):
        train_verifier(v, ex, None, steps=1, batch_size=8, lr=1e-3, generator=g, pair_weight=-1.0)


def test_prefix_training_reports_end_and_prefix_metrics(setup, trials):
    _, codec = setup
    v = build_verifier(codec.tokenizer, tiny=TINY, seed=0)
    ex = verifier_examples(trials, codec, prefixes=True)
    m = train_verifier(v, ex, ex, steps=2, batch_size=8, lr=1e-3, generator=torch.Generator().manual_seed(0))
    assert m["heldout/end/count"] == len(trials)
    assert m["heldout/prefix/count"] == sum(len(boundary_prefixes(t)) for t in trials)
    assert m["heldout/count"] == len(ex)


# ------------------------------------------------------------------ scoring


def test_one_pass_prefix_scores_equal_separate_prefix_passes(setup, trials):
    _, codec = setup
    v = random_head_verifier(codec.tokenizer)
    assert any(len(boundary_prefixes(t)) > 2 for t in trials) and len({len(t.ids) for t in trials}) > 1
    curves = score_prefixes(v, trials, rows=4)  # padded chunks of rows of different lengths
    ends_scores = score_trials(v, trials, rows=5)
    spread = []
    with torch.no_grad():
        for t, c, e in zip(trials, curves, ends_scores):
            ends = boundary_prefixes(t)
            assert c.shape == (len(ends),)
            alone = [
                torch.sigmoid(v(torch.tensor([t.ids[:b]]), torch.ones(1, b, dtype=torch.long), torch.tensor([b - 1]))).item()
                for b in ends
            ]
            np.testing.assert_allclose(c, alone, rtol=0, atol=1e-5)
            whole = torch.sigmoid(
                v(torch.tensor([t.ids]), torch.ones(1, len(t.ids), dtype=torch.long), torch.tensor([len(t.ids) - 1]))
            ).item()
            assert e == pytest.approx(whole, abs=1e-5)
            # [B, K] positions read K prefixes of one row at once
            k = torch.sigmoid(
                v(torch.tensor([t.ids]), torch.ones(1, len(t.ids), dtype=torch.long), torch.tensor([[b - 1 for b in ends]]))
            )
            np.testing.assert_allclose(k[0].numpy(), alone, rtol=0, atol=1e-5)
            spread.append(np.ptp(c))
    assert max(spread) > 1e-3  # the scores do differ between prefixes: the comparison is not vacuous


def test_save_load_round_trip_gives_identical_scores(setup, trials, tmp_path):
    _, codec = setup
    v = random_head_verifier(codec.tokenizer, seed=3)
    path = v.save(tmp_path / "verifier")
    assert is_saved_verifier(path) and not is_saved_verifier(tmp_path)
    loaded = load_verifier(path)
    np.testing.assert_array_equal(score_trials(loaded, trials), score_trials(v, trials))
    for a, b in zip(score_prefixes(loaded, trials), score_prefixes(v, trials)):
        np.testing.assert_array_equal(a, b)
    check_same_vocabulary(loaded.tokenizer, codec.tokenizer)
    assert json.loads((path / "verifier.json").read_text())["hidden_size"] == TINY.hidden_size


def test_verifier_from_a_causal_lm_directory_shares_its_trunk(setup, trials, tmp_path):
    policy, codec = setup
    policy.save_pretrained(tmp_path / "lm")
    codec.tokenizer.save_pretrained(tmp_path / "lm")
    v = build_verifier(codec.tokenizer, str(tmp_path / "lm"))
    copied = build_verifier(codec.tokenizer, "policy", policy=policy)
    assert type(v.trunk) is type(policy.base_model)  # the base model, without the LM head
    for a, b in zip(v.state_dict().values(), copied.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="needs the policy"):
        build_verifier(codec.tokenizer, "policy")


def test_trained_verifier_plugs_into_the_j_estimator(setup, trials, tmp_path):
    policy, codec = setup
    v = random_head_verifier(codec.tokenizer, seed=1)
    path = str(v.save(tmp_path / "verifier"))
    curves = trained_verifier_estimator(policy, codec, trials, JOptions(verifier=path, rows=4))
    for a, b in zip(curves, score_prefixes(v, trials)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    # bonus.estimator=verifier with bonus.verifier=<a saved verifier directory>
    cfg = BonusConfig(name="info_gain", estimator="verifier", verifier=path, alpha=0.5)
    bonuses, via_bonus = episode_bonuses(cfg, policy, codec, trials, BUDGET.answer_max_tokens)
    for a, b in zip(via_bonus, curves):  # other rows per pass (32 vs 4): equal up to float rounding
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    for t, b, c in zip(trials, bonuses, curves):  # bonus.final_episode=true: they telescope to the outcome
        assert np.isclose(sum(b), 0.5 * (t.outcome - c[0]))
    with pytest.raises(FileNotFoundError, match="not a saved verifier"):
        trained_verifier_estimator(policy, codec, trials, JOptions(verifier=str(tmp_path / "nope")))


# --------------------------------------------------------------- best-of-N


def test_best_of_n_by_hand():
    scores = [[0.2, 0.9, 0.9], [0.5, 0.1, 0.7]]
    outcomes = [[1, 0, 1], [0, 1, 0]]
    answers = [["4", "5", " 4 "], ["x", None, "x"]]
    tokens = [[10, 20, 30], [5, 5, 5]]
    r = best_of_n(scores, outcomes, [1, 2, 3], answers=answers, tokens=tokens)
    assert r["n"] == [1, 2, 3]
    assert r["best_of_n"] == [0.5, 0.0, 0.0]  # N=3, problem 0: a tie of 0.9 goes to the first (an outcome 0)
    assert r["pass_at_n"] == [0.5, 1.0, 1.0]
    assert r["mean_outcome"] == pytest.approx([0.5, 0.5, 0.5])
    assert r["maj_at_n"] == [0.5, 0.5, 0.5]  # N=2, problem 0: "4" and "5" tie, the first seen wins
    assert r["tokens"] == [7.5, 20.0, 37.5]
    # share of the N trials giving the picked answer ("4" and " 4 " are one answer, None is ""):
    # N=3 picks "5" (1/3 of problem 0) and "x" (2/3 of problem 1); a random pick: 5/9 each
    assert r["pick_answer_share"] == pytest.approx([1.0, 0.5, 0.5])
    assert r["answer_share"] == pytest.approx([1.0, 0.5, 5 / 9])
    # the vote scores answer_scores (env.score of the answer) when given, not the outcome
    r = best_of_n(scores, outcomes, [1], answers=answers, answer_scores=[[0, 1, 1], [1, 1, 1]])
    assert r["maj_at_n"] == [0.5] and "tokens" not in r
    # best-of-N picks the argmax
    assert best_of_n([[0.1, 0.3, 0.2]], [[0, 0, 1]], [3])["best_of_n"] == [0.0]
    assert best_of_n([[0.1, 0.2, 0.3]], [[0, 0, 1]], [3])["best_of_n"] == [1.0]


def test_best_of_n_relations_on_random_data():
    rng = np.random.default_rng(0)
    p, n = 40, 8
    outcomes = (rng.random((p, n)) < rng.random((p, 1))).astype(float)
    scores = np.round(rng.random((p, n)), 1)  # ties
    answers = rng.choice(np.array(["1", "2", "3", "", None], dtype=object), size=(p, n))
    ns = list(range(1, n + 1))
    r = best_of_n(scores, outcomes, ns, answers=answers, tokens=rng.integers(1, 50, (p, n)))
    oracle = best_of_n(outcomes, outcomes, ns)["best_of_n"]
    worst = best_of_n(-outcomes, outcomes, ns)["best_of_n"]
    for i in range(n):
        assert worst[i] <= r["best_of_n"][i] <= r["pass_at_n"][i]
        assert worst[i] <= r["mean_outcome"][i] <= r["pass_at_n"][i]
        assert r["maj_at_n"][i] <= r["pass_at_n"][i]
    assert oracle == r["pass_at_n"]
    assert worst == pytest.approx([outcomes[:, :k].min(1).mean() for k in ns])
    assert all(np.diff(r["pass_at_n"]) >= 0) and all(np.diff(r["tokens"]) > 0)
    assert r["best_of_n"][0] == r["pass_at_n"][0] == r["mean_outcome"][0] == outcomes[:, 0].mean()


def test_best_of_n_over_trials_matches_evaluate(setup, trials):
    _, codec = setup
    scores = score_trials(random_head_verifier(codec.tokenizer), trials)
    r = best_of_n_trials(scores, trials, [1, 3])
    outcome = np.array([t.outcome for t in trials]).reshape(6, 3)
    assert r["maj_at_n"][1] == pytest.approx(maj_at_k(trials))  # maj@k of evaluate over the same trials
    assert r["pass_at_n"][1] == pytest.approx((outcome.max(1) >= 1.0).mean())
    assert r["best_of_n"][1] == pytest.approx(outcome[np.arange(6), scores.reshape(6, 3).argmax(1)].mean())
    assert r["tokens"][0] == pytest.approx(np.mean([t.policy_tokens for t in trials[::3]]))


# ----------------------------------------------------------- entry point


def test_run_verifier_training_end_to_end(setup, tmp_path):
    policy, codec = setup
    cfg = VerifierConfig(
        num_train_problems=4,
        samples_per_problem=2,
        num_heldout_problems=3,
        n_values=[1, 2],
        steps=3,
        batch_size=8,
        eval_every=2,
        log_every=1,
        rollout_rows=5,
        rows=4,
    )
    make_env = lambda split: gym.make(ENV, split=split, max_episodes=BUDGET.max_episodes)  # noqa: E731
    logged = []
    verifier = build_verifier(codec.tokenizer, "policy", policy=policy)
    summary = run_verifier_training(
        policy,
        codec,
        make_env,
        verifier,
        BUDGET,
        cfg,
        torch.Generator().manual_seed(0),
        tmp_path,
        log=lambda m, s: logged.append((s, m)),
    )
    assert summary["train_trials"] == 8 and summary["heldout_trials"] == 6 and summary["heldout_problems"] == 3
    assert summary["train_examples"] > 8  # prefixes too
    assert 0 <= summary["heldout/accuracy"] <= 1
    bon = summary["best_of_n"]
    assert bon["n"] == [1, 2] and all(b <= p for b, p in zip(bon["best_of_n"], bon["pass_at_n"]))
    assert (tmp_path / "best_of_n.png").is_file() and (tmp_path / "verifier_summary.json").is_file()
    assert "best_of_n/maj_at_n@2" in logged[-1][1] and logged[-1][0] == cfg.steps
    rows = [json.loads(line) for line in (tmp_path / "heldout_scores.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and [r["group"] for r in rows] == [0, 0, 1, 1, 2, 2]
    groups = np.array([r["group"] for r in rows])
    labels = np.array([r["outcome"] >= 1.0 for r in rows], dtype=float)
    scores = np.array([r["score"] for r in rows])
    # the file holds the scores best-of-N ranked by, and the summary's within-problem AUROC is theirs
    assert bon["best_of_n"][1] == pytest.approx(
        np.mean([rows[2 * p + int(scores[2 * p + 1] > scores[2 * p])]["outcome"] for p in range(3)])
    )
    want, mixed = within_problem_auroc(scores, labels, groups)
    assert summary["heldout/end/mixed_problems"] == mixed
    if mixed:
        assert summary["heldout/end/within_problem_auroc"] == pytest.approx(want)
    loaded = load_verifier(summary["verifier_dir"])
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), verifier.state_dict().values()))


# ------------------------------------------------------------------ bad input


def test_bad_input_fails_naming_the_fault(setup, trials, tmp_path):
    _, codec = setup
    v = build_verifier(codec.tokenizer, tiny=TINY, seed=0)
    with pytest.raises(ValueError, match="no trials"):
        verifier_examples([], codec, prefixes=True)
    with pytest.raises(ValueError, match="no trials"):
        score_trials(v, [])
    unfinished = Trial(problem_id="open", group=0)
    unfinished.append([5, 6], False, -1)
    with pytest.raises(ValueError, match="problem open.*no final answer"):
        verifier_examples([unfinished], codec, prefixes=False)
    with pytest.raises(ValueError, match="one shape"):
        best_of_n([[0.1, 0.2]], [[1, 0, 1]], [1])
    with pytest.raises(ValueError, match=r"n_values must be integers in \[1, 2\]"):
        best_of_n([[0.1, 0.2]], [[1, 0]], [3])
    with pytest.raises(ValueError, match="answers must have the shape"):
        best_of_n([[0.1, 0.2]], [[1, 0]], [1], answers=[["a"]])
    with pytest.raises(ValueError, match="one length"):
        auroc([0.1, 0.2], [1])
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        brier([0.1, 0.2], [1, 2])
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        expected_calibration_error([1.5], [1])
    with pytest.raises(ValueError, match="same number of trials"):
        best_of_n_trials(np.zeros(len(trials) - 1), trials[:-1], [1])
    with pytest.raises(ValueError, match="scores must have shape"):
        best_of_n_trials(np.zeros(3), trials, [1])
    with pytest.raises(ValueError, match="padding"):
        v(torch.tensor([[5, 6, 0]]), torch.tensor([[1, 1, 0]]), torch.tensor([2]))
    with pytest.raises(ValueError, match="right-padded"):
        v(torch.tensor([[0, 5, 6]]), torch.tensor([[0, 1, 1]]), torch.tensor([2]))
    with pytest.raises(ValueError, match="positions"):
        v(torch.tensor([[5, 6]]), torch.ones(1, 2, dtype=torch.long), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="embedding size"):
        v(torch.tensor([[5, 10**6]]), torch.ones(1, 2, dtype=torch.long), torch.tensor([1]))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_verifier(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="verifier.json not found"):
        load_verifier(tmp_path)

    class OtherVocab:
        def get_vocab(self):
            return {"a": 0}

    with pytest.raises(ValueError, match="same vocabulary"):
        check_same_vocabulary(OtherVocab(), codec.tokenizer)


def test_metric_functions_reject_empty_input():
    for fn in (brier, expected_calibration_error, auroc):
        with pytest.raises(ValueError, match="no examples"):
            fn([], [])


def test_algo_verifier_job_then_ppo_with_its_verifier_as_the_j_estimator(tmp_path):
    """`python train.py job=train_verifier` writes a verifier that `bonus.estimator=verifier
    bonus.verifier=RUN/verifier` then uses in PPO (tiny sizes, one thread)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from metarl_llm.jobs.common import validate
    from metarl_llm.runtime.setup import register_configs
    from metarl_llm.trainer import train

    root = ROOT
    small = [
        "model.tiny.hidden_size=32",
        "model.tiny.num_layers=1",
        "model.tiny.num_heads=2",
        "model.tiny.intermediate_size=64",
        "warm_start.steps=4",
        "warm_start.focused_until_loss=0",
        "warm_start.num_traces=32",
        "warm_start.batch_size=8",
        f"warm_start.cache_dir={tmp_path / 'cache'}",
        "logger.mode=disabled",
        "logger.progress_bar=false",
        "threads=1",
    ]
    register_configs()

    def cfg_of(*overrides):
        with initialize_config_dir(version_base=None, config_dir=str(root / "conf")):
            return OmegaConf.to_object(compose("config", overrides=[*small, *overrides]))

    summary = train(
        cfg_of(
            "job=train_verifier",
            "verifier.num_train_problems=4",
            "verifier.samples_per_problem=2",
            "verifier.num_heldout_problems=3",
            "verifier.n_values=[1,2]",
            "verifier.steps=3",
            "verifier.batch_size=8",
            "verifier.eval_every=0",
            "verifier.tiny.hidden_size=32",
            "verifier.tiny.num_layers=1",
            "verifier.tiny.num_heads=2",
            "verifier.tiny.intermediate_size=64",
        ),
        tmp_path / "vrun",
    )
    assert summary["algo"] == "verifier" and summary["best_of_n"]["n"] == [1, 2]
    assert json.loads((tmp_path / "vrun" / "summary.json").read_text())["heldout_trials"] == 6
    assert is_saved_verifier(tmp_path / "vrun" / "verifier")

    ppo = cfg_of(
        "bonus=info_gain",
        "bonus.estimator=verifier",
        f"bonus.verifier={tmp_path / 'vrun' / 'verifier'}",
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
    out = train(ppo, tmp_path / "prun")
    assert out["bonus"] == "info_gain/verifier"
    rows = [json.loads(x) for x in (tmp_path / "prun" / "metrics.jsonl").read_text().splitlines()]
    assert any("train/J/boundary_0" in r for r in rows)
    with pytest.raises(ValueError, match="saved verifier directory"):
        validate(cfg_of("bonus=info_gain", "bonus.estimator=verifier", f"bonus.verifier={tmp_path / 'nothing'}"))
