"""Test-time training and augmented voting for ARC: leave-one-out data never holds the
held-out pair in its own context nor the real test pair; the LoRA reset gives back the
base model's logits exactly; adaptation lowers the LOO loss of a tiny model; the
hierarchical vote on hand-made prediction sets; pass@2; the voting pipeline (prompts,
batching, inversion) against a scripted decoder, and the greedy KV-cache decoder
against an uncached argmax loop."""

import numpy as np
import pytest
import torch

from envs.arc_grids import ArcTask, format_grid, parse_grid, task_prompt
from metarl_llm.arc import vote as arc_vote
from metarl_llm.arc.augment import IDENTITY, dihedral, dihedral_transforms, random_transforms
from metarl_llm.arc.ttt import LooSplit, TestTimeTrainer, TTTConfig, encode_examples, leave_one_out_splits, leave_one_out_tasks
from metarl_llm.arc.vote import Decoded, answer_text, greedy_decode, parse_answer, pass_at_2, predict_with_voting, vote
from metarl_llm.config import TinyModelConfig
from metarl_llm.core.trial import StreamCodec
from metarl_llm.models import build_char_tokenizer, build_tiny_model

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # raised inside peft


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one intra-op thread is fastest, and two threads on a busy
    2-core machine slow the training steps down by 100x (spinning workers)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY = TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)


def grid(rng, h, w):
    return tuple(tuple(int(v) for v in row) for row in rng.integers(0, 10, (h, w)))


def fliplr(g):
    return tuple(row[::-1] for row in g)


def flip_task(task_id="flip", n=4, seed=0, side=3):
    """Demonstrations: side x side grids mirrored left-right. Test pair: a 2x5 input and a
    3x7 output, shapes no demonstration (in any dihedral frame) has."""
    rng = np.random.default_rng(seed)
    train = []
    while len(train) < n:
        g = grid(rng, side, side)
        if (g, fliplr(g)) not in train:
            train.append((g, fliplr(g)))
    return ArcTask.build(task_id, train, [(grid(rng, 2, 5), grid(rng, 3, 7))])


def prompt_pairs(prompt):
    """(context pairs, query) read back from a task_prompt text."""
    lines = prompt.split("\n")
    assert lines[-1] == "" and lines[-2].endswith(">")
    ctx = [tuple(parse_grid(x) for x in line.split(">")) for line in lines[:-2]]
    return ctx, parse_grid(lines[-2][:-1])


# ----------------------------------------------------------------- LOO data


def test_loo_holds_each_demonstration_out_in_the_episode_format():
    task = flip_task()
    splits = leave_one_out_splits(task, np.random.default_rng(0), num_augmentations=0, max_tasks=100)
    assert [s.held_out for s in splits] == [0, 1, 2, 3] and isinstance(splits[0], LooSplit)
    for s in splits:
        i = s.held_out
        assert s.transform == IDENTITY
        assert (s.query, s.target) == task.train[i]
        assert s.context == tuple(p for j, p in enumerate(task.train) if j != i)  # the task's order
    examples = leave_one_out_tasks(task, np.random.default_rng(0), 0, 100)
    prompt, target = examples[1]
    assert prompt == task_prompt(splits[1].context, splits[1].query) and prompt.endswith(">\n")
    assert target == f"Answer: {format_grid(task.train[1][1])}" == answer_text(task.train[1][1])


def test_loo_never_shows_the_held_out_output_in_context_nor_the_test_pair():
    task = flip_task(n=5)
    test_in, test_out = task.test[0]
    for seed in range(3):
        splits = leave_one_out_splits(task, np.random.default_rng(seed), num_augmentations=12, max_tasks=40)
        examples = leave_one_out_tasks(task, np.random.default_rng(seed), 12, 40)
        assert len(splits) == len(examples) == 40
        assert [s.transform == IDENTITY for s in splits[:5]] == [True] * 5  # un-augmented first
        assert len({s.transform for s in splits}) > 5
        for s, (prompt, target) in zip(splits, examples):
            ctx, query = prompt_pairs(prompt)
            assert tuple(ctx) == s.context and query == s.query
            assert parse_answer(target) == s.target
            context_grids = [g for p in ctx for g in p]
            assert (s.query, s.target) not in ctx
            assert s.target not in context_grids  # distinct demonstrations: the output is nowhere in context
            assert len(ctx) == 4
            # back in the original frame: the held-out demonstration, the others as context
            inv = s.transform.inverse()
            assert (inv.apply(s.query), inv.apply(s.target)) == task.train[s.held_out]
            others = [p for j, p in enumerate(task.train) if j != s.held_out]
            assert sorted(inv.apply_pairs(s.context)) == sorted(others)
            # the real test pair: its shapes (2x5 -> 3x7, or transposed) never occur
            shapes = {(len(g), len(g[0])) for g in context_grids + [s.query, s.target]}
            assert shapes == {(3, 3)}
            assert format_grid(test_in) not in prompt + target and format_grid(test_out) not in prompt + target


def test_loo_with_a_repeated_pair_drops_it_from_its_own_context():
    rng = np.random.default_rng(1)
    p, q, r = ((grid(rng, 2, 2), grid(rng, 2, 2)) for _ in range(3))
    same_out = (grid(rng, 2, 2), p[1])  # another input with p's output: a legitimate demonstration
    task = ArcTask.build("dup", [p, q, p, same_out], [(grid(rng, 1, 1), grid(rng, 1, 1))])
    splits = leave_one_out_splits(task, np.random.default_rng(0), num_augmentations=6, max_tasks=100)
    base = [s for s in splits if s.transform == IDENTITY]
    assert [s.held_out for s in base] == [0, 1, 3]  # index 2 repeats index 0: not held out again
    assert base[0].context == (q, same_out)  # both copies of p left out of p's context
    assert base[1].context == (p, p, same_out)
    for s in splits:
        assert (s.query, s.target) not in s.context
    only_copies = ArcTask.build("copies", [p, p, p], [(q[0], q[1])])
    with pytest.raises(ValueError, match="no two distinct demonstrations"):
        leave_one_out_splits(only_copies, np.random.default_rng(0), 2, 10)
    with pytest.raises(ValueError, match="needs at least 2"):
        leave_one_out_splits(ArcTask.build("one", [p], [q]), np.random.default_rng(0), 2, 10)


def test_loo_cap_and_seeding():
    task = flip_task(n=4)
    a = leave_one_out_tasks(task, np.random.default_rng(3), 5, 10)
    assert a == leave_one_out_tasks(task, np.random.default_rng(3), 5, 10)
    assert a != leave_one_out_tasks(task, np.random.default_rng(4), 5, 10)
    assert len(a) == 10 and len(set(a)) == 10
    assert len(leave_one_out_tasks(task, np.random.default_rng(3), 5, 1000)) == 4 * 6
    capped = leave_one_out_splits(task, np.random.default_rng(3), 5, 3)
    assert len(capped) == 3 and all(s.transform == IDENTITY for s in capped)
    with pytest.raises(ValueError, match="max_tasks"):
        leave_one_out_tasks(task, np.random.default_rng(3), 5, 0)
    with pytest.raises(ValueError, match="num_augmentations"):
        leave_one_out_tasks(task, np.random.default_rng(3), -1, 5)


# ----------------------------------------------------------------- training


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def tiny(tok, seed=0):
    return build_tiny_model(TINY, len(tok), tok.pad_token_id, seed)


def test_encode_examples_masks_the_prompt_and_ends_with_eos(tok):
    ((ids, mask),) = encode_examples(tok, [("12>21\n3>", "Answer: 3")])
    assert ids[-1] == tok.eos_token_id and len(ids) == len(mask)
    assert tok.decode(ids[: mask.index(1)]) == "12>21\n3>"
    assert tok.decode(ids[mask.index(1) : -1]) == "Answer: 3"
    assert sum(mask) == len("Answer: 3") + 1


def test_reset_restores_the_base_models_logits_exactly(tok):
    model = tiny(tok)
    ids = torch.tensor([tok.encode(task_prompt(flip_task().train, flip_task().test[0][0]) + "Answer: 1")])
    with torch.no_grad():
        base = model(input_ids=ids).logits.clone()
    trainer = TestTimeTrainer(model, tok, TTTConfig(num_augmentations=2, epochs=2, lr=1e-2))
    assert all("lora_" in n for n, p in trainer.model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        assert torch.equal(trainer.model(input_ids=ids).logits, base)  # fresh adapter: B = 0
    losses = trainer.adapt(flip_task())
    assert losses and all(np.isfinite(losses))
    with torch.no_grad():
        adapted = trainer.model(input_ids=ids).logits.clone()
        assert not torch.allclose(adapted, base, atol=1e-4)
        with trainer.base_model() as m:
            assert torch.equal(m(input_ids=ids).logits, base)  # adapter disabled
        assert torch.equal(trainer.model(input_ids=ids).logits, adapted)  # and re-enabled
    trainer.reset()
    with torch.no_grad():
        assert torch.equal(trainer.model(input_ids=ids).logits, base)
        torch.testing.assert_close(trainer.model(input_ids=ids).logits, base, atol=0, rtol=0)


def test_adapt_lowers_the_loo_loss_seeded_and_leaves_the_global_rng_alone(tok):
    task = flip_task()
    cfg = TTTConfig(num_augmentations=3, epochs=8, lr=1e-2, batch_size=4, seed=1)
    trainer = TestTimeTrainer(tiny(tok), tok, cfg)
    examples = trainer.examples(task)
    assert len(examples) == 16
    before = trainer.loss(examples)
    state = torch.get_rng_state()
    losses = trainer.adapt(task)
    assert torch.equal(torch.get_rng_state(), state)
    assert len(losses) == cfg.epochs * 4
    after = trainer.loss(examples)
    assert after < before - 0.2, (before, after)
    assert np.mean(losses[-4:]) < np.mean(losses[:4])
    assert not trainer.model.training
    # adapt resets first: a second adapt repeats the first exactly
    assert trainer.adapt(task) == losses
    # another model with the same seed and config trains identically
    assert TestTimeTrainer(tiny(tok), tok, cfg).adapt(task) == losses


def test_adapting_on_another_problem_is_the_control(tok):
    task, other = flip_task("a", seed=0), flip_task("b", seed=5)
    trainer = TestTimeTrainer(tiny(tok), tok, TTTConfig(num_augmentations=1, epochs=2, lr=1e-2))
    own = trainer.examples(task)
    assert all(o not in own for o in trainer.examples(other))
    on_other = trainer.adapt(other)
    state_other = [p.detach().clone() for p in trainer.params]
    trainer.adapt(task)
    assert any(not torch.equal(a, b) for a, b in zip(state_other, trainer.params))
    assert on_other == trainer.adapt(other)  # reset in between: no carry-over
    assert np.isfinite(trainer.loss(own))


def test_ttt_config_and_trainer_validation(tok):
    with pytest.raises(ValueError, match="ttt.r"):
        TTTConfig(r=0).validate()
    with pytest.raises(ValueError, match="ttt.lr"):
        TTTConfig(lr=0).validate()
    with pytest.raises(ValueError, match="ttt.num_augmentations"):
        TTTConfig(num_augmentations=8, colour_augment=False).validate()
    with pytest.raises(ValueError, match="ttt.dropout"):
        TTTConfig(dropout=1.0).validate()
    with pytest.raises(ValueError, match="ttt.target_modules"):
        TestTimeTrainer(tiny(tok), tok, TTTConfig(target_modules=["c_attn"]))
    trainer = TestTimeTrainer(tiny(tok), tok, TTTConfig(max_length=10))
    with pytest.raises(ValueError, match="max_length"):
        trainer.adapt(flip_task())


# ------------------------------------------------------------------- voting

A, B, C = ((1,),), ((2, 2),), ((3,), (3,))


def test_vote_sums_the_kept_votes_of_each_transform():
    sets = [[A, A, B], [B, B], [A]]
    # all candidates kept: A 2+1=3 over 2 transforms, B 1+2=3 over 2: tie, A seen first
    assert vote(sets, top_k=None) == [A, B]
    assert vote(sets, top_k=1) == [A, B]  # kept: A:2, B:2, A:1 -> A 3, B 2
    # B has most votes inside one transform, A the support of three
    sets = [[B, B, B, A], [A], [A]]
    assert vote(sets, top_k=None) == [A, B]  # A 3 (3 transforms) ties B 3 (1 transform): support wins
    assert vote(sets, top_k=1) == [B, A]  # kept: B:3, A:1, A:1 -> B 3, A 2
    assert vote([[B, B, A, C, C, A, A]], top_k=2, attempts=None) == [A, B]  # C cut by top_k: A3 B2 C2 (B first)
    assert vote([[C, A, A, B, B, C, C]], top_k=None, attempts=None) == [C, A, B]


def test_vote_ties_unparseable_predictions_and_attempt_count():
    assert vote([[B, A]], top_k=1) == [B]  # within-transform tie: first seen
    assert vote([[None, A], [B, None]]) == [A, B]  # global tie, equal support: first seen (A at position 2)
    assert vote([[None, None], [None]]) == []
    assert vote([]) == []
    assert vote([[A, None, None, None], [None, B, B]]) == [B, A]  # None casts no vote
    assert vote([[A], [B], [C]], attempts=2) == [A, B]
    assert vote({"identity": [C], "rot90": [A, A]}) == [A, C]  # mappings in their order
    with pytest.raises(ValueError, match="top_k"):
        vote([[A]], top_k=0)
    with pytest.raises(ValueError, match="sequence"):
        vote(["12/34"])


def test_pass_at_2():
    assert pass_at_2([A, B], B) == 1.0
    assert pass_at_2([A], A) == 1.0
    assert pass_at_2([A, B], C) == 0.0
    assert pass_at_2([], A) == 0.0
    assert pass_at_2([None, [[3], [3]]], C) == 1.0  # nested lists are grids too
    assert pass_at_2([((1, 1),)], ((1,), (1,))) == 0.0  # shape matters
    with pytest.raises(ValueError, match="at most 2"):
        pass_at_2([A, B, C], A)


def test_parse_answer():
    assert parse_answer("Answer: 12/34") == ((1, 2), (3, 4))
    assert parse_answer("think 9 Answer: 1 Answer: 7/8 ") == ((7,), (8,))
    assert parse_answer("12/34") is None
    assert parse_answer("12/34", require_marker=False) == ((1, 2), (3, 4))
    assert parse_answer("Answer: 12/3") is None and parse_answer("Answer:") is None


def test_predict_with_voting_maps_each_transform_back_and_votes(tok, monkeypatch):
    """A scripted decoder answers each transformed prompt with the transformed true output
    (so only a correct inverse recovers it), except three transforms that answer wrong,
    answer garbage, or answer a shared decoy."""
    task = flip_task(n=3)
    truth = fliplr(task.test[0][0])
    decoy = ((9, 9), (9, 9))
    transforms = random_transforms(np.random.default_rng(0), 7)
    answers = ["Answer: 1/2/3", "nonsense", decoy, truth, decoy, truth, truth]
    script = {}
    for t, a in zip(transforms, answers):
        prompt = task_prompt(t.apply_pairs(task.train), t.apply(task.test[0][0]))
        script[prompt] = a if isinstance(a, str) else answer_text(t.apply(a))
    calls = []

    def scripted(model, contexts, max_new_tokens, stop_ids, pad_id, greedy, generator=None, max_rows=512):
        calls.append((len(contexts), greedy))
        rows = [tok.encode(script[tok.decode(c)]) + [tok.eos_token_id] for c in contexts]
        width = max(map(len, rows))
        tokens = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows])
        return Decoded(tokens, torch.tensor([len(r) for r in rows]))

    monkeypatch.setattr(arc_vote, "decode", scripted)
    model = tiny(tok)
    pred = predict_with_voting(model, tok, task, transforms, 2, 40)
    assert calls == [(14, False)]  # one batched call, 7 transforms x 2 samples
    assert pred.attempts == [truth, decoy]  # truth from 3 transforms (2 votes each), decoy from 2
    assert pred.candidates[0] == [parse_grid("1/2/3")] * 2 and pred.candidates[1] == [None, None]
    assert pred.candidates[5] == [truth, truth] and pred.candidates[4] == [decoy, decoy]
    assert pred.texts[5][0] == answer_text(transforms[5].apply(truth)) != answer_text(truth)
    assert pass_at_2(pred.attempts, task.test[0][1]) == 0.0  # the test output (3x7) was never the target here
    calls.clear()
    pred = predict_with_voting(model, tok, task, transforms[2:5], 1, 40)
    assert calls == [(3, True)] and pred.attempts == [decoy, truth]  # 2 votes to 1


def test_predict_with_voting_runs_a_tiny_model_greedy_and_sampled(tok):
    task = flip_task(n=3)
    model = tiny(tok)
    model.train()
    codec = StreamCodec(tok, "\n", "Answer:")
    g = predict_with_voting(model, tok, task, dihedral_transforms(), 1, 12, codec=codec)
    assert model.training  # mode restored
    assert len(g.texts) == 8 and all(len(t) == 1 for t in g.texts) and len(g.attempts) <= 2
    again = predict_with_voting(model, tok, task, dihedral_transforms(), 1, 12)
    assert again.texts == g.texts  # greedy is deterministic
    s1 = predict_with_voting(
        model, tok, task, dihedral_transforms()[:3], 4, 12, torch.Generator().manual_seed(0), force_marker=True
    )
    s2 = predict_with_voting(
        model, tok, task, dihedral_transforms()[:3], 4, 12, torch.Generator().manual_seed(0), force_marker=True
    )
    assert s1.texts == s2.texts and all(len(t) == 4 for t in s1.texts)
    with pytest.raises(ValueError, match="duplicates"):
        predict_with_voting(model, tok, task, [IDENTITY, dihedral(0)], 1, 12)
    with pytest.raises(ValueError, match="test_index"):
        predict_with_voting(model, tok, task, [IDENTITY], 1, 12, test_index=1)
    with pytest.raises(ValueError, match="samples_per_transform"):
        predict_with_voting(model, tok, task, [IDENTITY], 0, 12)


def test_greedy_decode_matches_an_uncached_argmax_loop(tok):
    model = tiny(tok, seed=3).eval()
    contexts = [tok.encode("12/34>"), tok.encode("5>5\n678/901>"), tok.encode("9")]
    stop = torch.tensor([tok.eos_token_id])
    out = greedy_decode(model, contexts, 7, stop, tok.pad_token_id, max_rows=2)  # also split into two passes
    for r, c in enumerate(contexts):
        ids = list(c)
        with torch.no_grad():
            for _ in range(int(out.lengths[r])):
                ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        assert out.tokens[r, : int(out.lengths[r])].tolist() == ids[len(c) :]
        assert int(out.lengths[r]) == 7 or ids[-1] == tok.eos_token_id
