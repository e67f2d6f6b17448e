"""Augmented inference for ARC: predict under several invertible transforms and vote.

Answer format (the ARC environment's): the prompt is
``task_prompt(train_pairs, test_input)`` (demonstration lines ``in>out``, then
``query>``, then a newline) and the policy answers with one episode
``"Answer: <grid>"`` (:func:`answer_text`, grid in the compact ``12/34`` format)
followed by EOS. :func:`parse_answer` reads such an episode: the text after the last
``Answer:`` marker, parsed with :func:`envs.arc_grids.parse_grid`; anything else is
unparseable (None: no vote).

:func:`predict_with_voting` builds the prompt of each transformed task
``task_prompt(T(train), T(test_input))``, generates one episode per row (all
transforms and samples in one batched call with a KV cache; greedy when
``samples_per_transform == 1``, else ancestral samples), stops at EOS or the episode
delimiter ``\n``, parses each episode, maps the grid back with ``T.invert`` and
ranks the candidates with :func:`vote`. With ``force_marker=True`` the prompt ends
with ``"Answer:"`` (as the environment's forced answer does) and the model writes only
`` <grid>``.

Voting (:func:`vote`) is hierarchical:

1. *within a transform*: count each distinct candidate (unparseable ones are dropped);
   order by count, ties broken by first occurrence; keep the ``top_k`` best with their
   counts (``top_k=None`` keeps all);
2. *across transforms*: a grid's score is the **sum of its kept counts** over
   transforms; ties are broken by the number of transforms that kept it, then by first
   occurrence (transform order, then sample order; pass the identity transform first
   so that it wins remaining ties).

The first ``attempts`` (2: ARC's pass@2) grids of that ranking are the attempts.
"""

from __future__ import annotations

from collections import Counter
from typing import Mapping, NamedTuple, Sequence

import torch

from envs.arc_grids import ArcTask, Grid, as_grid, format_grid, parse_grid, task_prompt
from metarl_llm.arc.augment import Transform
from metarl_llm.core.trial import StreamCodec
from metarl_llm.rollout.sampling import sample

ANSWER_MARKER = "Answer:"
EPISODE_DELIMITER = "\n"


def answer_text(grid: Grid, marker: str = ANSWER_MARKER) -> str:
    """The episode text that answers ``grid``: ``"Answer: 12/34"`` (EOS not included)."""
    return f"{marker} {format_grid(grid)}"


def parse_answer(text: str, marker: str = ANSWER_MARKER, require_marker: bool = True) -> Grid | None:
    """The grid an episode answers, or None.

    The text after the last ``marker`` is parsed with :func:`parse_grid` (surrounding
    whitespace ignored). Without the marker the episode commits nothing (None) unless
    ``require_marker=False``, when the whole text is parsed (the forced-answer case,
    where the marker was in the prompt).
    """
    if not isinstance(text, str):
        return None
    if marker and marker in text:
        text = text[text.rfind(marker) + len(marker) :]
    elif require_marker:
        return None
    return parse_grid(text)


def vote(
    candidates_by_transform: Sequence[Sequence[Grid | None]] | Mapping[object, Sequence[Grid | None]],
    top_k: int | None = 3,
    attempts: int | None = 2,
) -> list[Grid]:
    """Rank candidate grids by hierarchical voting (see the module docstring).

    ``candidates_by_transform``: one sequence per transform (or a mapping transform ->
    sequence, in its iteration order) of candidate grids already mapped back to the
    original frame; None marks an unparseable prediction and casts no vote.
    ``top_k``: candidates kept per transform (None: all). ``attempts``: length of the
    returned ranking (None: every candidate that got a vote).

    Returns distinct grids, best first (empty when nothing parsed).
    """
    if top_k is not None and top_k < 1:
        raise ValueError(f"vote: top_k must be >= 1 or None, got {top_k}")
    if attempts is not None and attempts < 1:
        raise ValueError(f"vote: attempts must be >= 1 or None, got {attempts}")
    groups = (
        list(candidates_by_transform.values()) if isinstance(candidates_by_transform, Mapping) else list(candidates_by_transform)
    )
    score: Counter = Counter()
    support: Counter = Counter()
    first: dict[Grid, int] = {}
    position = 0
    for group in groups:
        if isinstance(group, (str, bytes)) or not isinstance(group, Sequence):
            raise ValueError(f"vote: each transform's candidates must be a sequence of grids, got {type(group).__name__}")
        counts: Counter = Counter()
        order: dict[Grid, int] = {}
        for cand in group:
            position += 1
            if cand is None:
                continue
            counts[cand] += 1
            order.setdefault(cand, position)
            first.setdefault(cand, position)
        ranked = sorted(counts, key=lambda g: (-counts[g], order[g]))
        for g in ranked[:top_k]:  # [:None] keeps all
            score[g] += counts[g]
            support[g] += 1
    ranking = sorted(score, key=lambda g: (-score[g], -support[g], first[g]))
    return ranking[:attempts] if attempts is not None else ranking


def pass_at_2(attempts: Sequence[Grid | None], answer: Grid) -> float:
    """ARC's score of one test input: 1.0 if one of at most 2 attempts equals ``answer``
    exactly (shape and every cell), else 0.0. None attempts count as wrong."""
    if len(attempts) > 2:
        raise ValueError(f"pass_at_2: at most 2 attempts are allowed, got {len(attempts)}")
    answer = as_grid(answer)
    return float(any(a is not None and as_grid(a) == answer for a in attempts))


# ---------------------------------------------------------------- generation


class Decoded(NamedTuple):
    """Output of :func:`decode`; N rows.

    tokens  [N, L] generated ids, ``pad_id`` after each row's end (the stop token kept).
    lengths [N]    tokens per row, the stop token included.
    """

    tokens: torch.Tensor
    lengths: torch.Tensor


@torch.no_grad()
def greedy_decode(
    model: torch.nn.Module,
    contexts: list[list[int]],
    max_new_tokens: int,
    stop_ids: torch.Tensor,
    pad_id: int,
    max_rows: int = 512,
) -> Decoded:
    """Greedy (argmax, first index on ties) continuations of token contexts, batched with
    a KV cache: :func:`metarl_llm.rollout.sampling.sample` with ``greedy=True``. Contexts are left-padded
    internally; rows stop at any of ``stop_ids`` or after ``max_new_tokens``."""

    out = sample(model, contexts, max_new_tokens, stop_ids, pad_id, None, max_rows, greedy=True)
    return Decoded(out.tokens, out.lengths)


def decode(
    model: torch.nn.Module,
    contexts: list[list[int]],
    max_new_tokens: int,
    stop_ids: torch.Tensor,
    pad_id: int,
    greedy: bool,
    generator: torch.Generator | None = None,
    max_rows: int = 512,
) -> Decoded:
    """Greedy (:func:`greedy_decode`) or ancestral (:func:`metarl_llm.rollout.sampling.sample`,
    temperature 1, seeded by ``generator``) continuations, one batched call."""
    if greedy:
        return greedy_decode(model, contexts, max_new_tokens, stop_ids, pad_id, max_rows)

    out = sample(model, contexts, max_new_tokens, stop_ids, pad_id, generator, max_rows)
    return Decoded(out.tokens, out.lengths)


class Prediction(NamedTuple):
    """Output of :func:`predict_with_voting`.

    attempts:   the voted grids, best first (at most ``attempts``; fewer when fewer
                distinct grids parsed): feed them to :func:`pass_at_2`.
    candidates: per transform, its ``samples_per_transform`` parsed grids mapped back to
                the original frame (None: unparseable).
    texts:      per transform, the generated episode texts (in the transformed frame,
                without the stop token).
    """

    attempts: list[Grid]
    candidates: list[list[Grid | None]]
    texts: list[list[str]]


def predict_with_voting(
    model: torch.nn.Module,
    tokenizer,
    task: ArcTask,
    transforms: Sequence[Transform],
    samples_per_transform: int,
    max_new_tokens: int,
    generator: torch.Generator | None = None,
    *,
    test_index: int = 0,
    top_k: int | None = 3,
    attempts: int = 2,
    force_marker: bool = False,
    marker: str = ANSWER_MARKER,
    codec=None,
    max_rows: int = 512,
) -> Prediction:
    """Predict the output of ``task.test[test_index]`` by augmented inference and voting.

    Only the test *input* is read; its output (the answer) never enters a prompt. For
    each transform ``T`` the prompt is ``task_prompt(T(task.train), T(test_input))``
    (plus ``marker`` when ``force_marker``), tokenised with the tokenizer's special
    tokens as the rollout does; ``samples_per_transform`` rows per transform are
    generated in one batched call (greedy when it is 1, else sampled with
    ``generator``), each up to ``max_new_tokens`` tokens or a stop (EOS, ``\\n``).
    Episodes are parsed (:func:`parse_answer`), mapped back with ``T.invert`` and
    ranked by :func:`vote` (``top_k``, ``attempts``). ``codec`` (a
    :class:`metarl_llm.core.trial.StreamCodec` for ``\\n``) may be passed to avoid
    rebuilding the stop ids per call. The model is run in eval mode and its mode is
    restored afterwards.
    """

    transforms = list(transforms)
    if not transforms or not all(isinstance(t, Transform) for t in transforms):
        raise ValueError("predict_with_voting: transforms must be a non-empty sequence of Transform objects")
    if len(set(transforms)) != len(transforms):
        raise ValueError(f"predict_with_voting: transforms contain duplicates ({[t.name for t in transforms]})")
    if samples_per_transform < 1:
        raise ValueError(f"predict_with_voting: samples_per_transform must be >= 1, got {samples_per_transform}")
    if max_new_tokens < 1:
        raise ValueError(f"predict_with_voting: max_new_tokens must be >= 1, got {max_new_tokens}")
    if not 0 <= test_index < len(task.test):
        raise ValueError(f"predict_with_voting: test_index={test_index} out of range for {len(task.test)} test pair(s)")
    codec = codec if codec is not None else StreamCodec(tokenizer, EPISODE_DELIMITER, marker)
    query = task.test[test_index][0]
    contexts: list[list[int]] = []
    for t in transforms:
        prompt = task_prompt(t.apply_pairs(task.train), t.apply(query)) + (marker if force_marker else "")
        contexts += [tokenizer.encode(prompt, add_special_tokens=True)] * samples_per_transform
    was_training = model.training
    model.eval()
    try:
        out = decode(
            model,
            contexts,
            max_new_tokens,
            codec.stop_ids,
            codec.pad_id,
            greedy=samples_per_transform == 1,
            generator=generator,
            max_rows=max_rows,
        )
    finally:
        model.train(was_training)
    texts: list[list[str]] = []
    candidates: list[list[Grid | None]] = []
    for k, t in enumerate(transforms):
        rows = range(k * samples_per_transform, (k + 1) * samples_per_transform)
        ts = [codec.episode_text(out.tokens[r, : int(out.lengths[r])].tolist()) for r in rows]
        grids = [parse_answer(x, marker, require_marker=not force_marker) for x in ts]
        texts.append(ts)
        candidates.append([t.invert(g) if g is not None else None for g in grids])
    return Prediction(vote(candidates, top_k, attempts), candidates, texts)
