"""Dense per-episode bonuses (docs/design.md section 6).

``none`` gives zeros. ``info_gain`` gives MRT's progress bonus

    bonus_j = alpha * (J(z_0..j) - J(z_0..j-1)),

where J(prefix) is the meta-prover's success after the prefix: append the
forced-answer text, let the policy answer, and score the answer as the trial would be
scored at that point (``env.forced_outcome``: the episodes so far plus that answer).
J_empty is measured after the prompt and J_j after every episode j before the
final-answer one, after any observation the environment inserted in reply to it
(:func:`boundary_prefixes`).

Where the bonuses telescope to (``bonus.final_episode``):

- ``true`` (default): the answer episode gets its progress too, with J after it taken
  as the outcome that was rewarded, so a trial's bonuses sum to
  ``alpha * (outcome - J_empty)``: pure potential-based shaping. It is the same for a
  trial that answers at once and one that restates its answer uncommitted in an extra
  episode first; only the split of credit among episodes changes.
- ``false``: the answer episode gets none, and the bonuses sum to
  ``alpha * (J_last - J_empty)`` with J_last measured *before* the answer episode. Writing
  the answer once uncommitted and committing it in one more episode then earns
  ``alpha * J_last`` on top of the outcome: a pay-off for an extra episode (a length
  incentive, the opposite of token efficiency). Kept for comparison.

Estimators of J (``bonus.estimator``), all returning, per trial, J at its boundaries:

- ``sample``: the mean score of ``num_samples`` sampled meta-prover answers per
  boundary (unbiased, noisy, costs ``num_samples`` short generations per boundary).
- ``likelihood``: the probability that the meta-prover writes the environment's
  canonical correct answer (``env.answer_target()``), teacher-forced, combined with the
  outcome the episodes so far already secure (:func:`_with_outcome_so_far`). Exact for
  that surface form and noise-free; where other surface forms are also correct it is a
  lower bound on J. All boundaries of a trial are scored in one forward pass: the
  stream is encoded once and each boundary's answer block attends to the stream
  prefix up to its boundary through a block attention mask.
- ``verifier``: J from a verifier that reads the problem and the episodes so far
  (``bonus.verifier`` names it in :data:`VERIFIERS`); no generation.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
import torch

from metarl_llm.config import BonusConfig
from metarl_llm.core.batch import pad_rows
from metarl_llm.core.registry import Registry
from metarl_llm.core.trial import StreamCodec, Trial
from metarl_llm.rollout.base import Engine
from metarl_llm.rollout.meta_prover import JOptions, boundary_prefixes, episodes_before, meta_prover_success
from metarl_llm.verify.model import is_saved_verifier
from metarl_llm.verify.scoring import trained_verifier_estimator

Estimator = Callable[[torch.nn.Module, StreamCodec, list[Trial], JOptions], list[np.ndarray]]
ESTIMATORS = Registry("progress estimator", "bonus.estimator")  # name -> Estimator
register_estimator = ESTIMATORS.register
get_estimator = ESTIMATORS.lookup


@register_estimator("sample")
def estimate_sample(model: torch.nn.Module, codec: StreamCodec, trials: list[Trial], opts: JOptions) -> list[np.ndarray]:
    """J at every boundary of every trial: the mean score of ``num_samples`` meta-prover
    answers (all boundaries of all trials in one batched sampling call)."""
    ends = [boundary_prefixes(t) for t in trials]
    return meta_prover_success(
        model, codec, trials, ends, opts.num_samples, opts.answer_max_tokens, opts.generator, opts.engine, opts.greedy
    )


class _Packed(NamedTuple):
    """One trial packed for the block-masked likelihood pass (lists of equal length L).

    ids, pos: token ids and position ids; seg: -1 on stream tokens, k on boundary k's
    answer block; limit: stream keys a query may see are those with index < limit.
    target_q[k], target_tok[k]: query index predicting each target token of block k and
    that token; stop_q[k]: query index whose next token must be a stop (or -1).
    """

    ids: list[int]
    pos: list[int]
    seg: list[int]
    limit: list[int]
    target_q: list[list[int]]
    target_tok: list[list[int]]
    stop_q: list[int]


def _pack(codec: StreamCodec, trial: Trial) -> _Packed:
    ends = boundary_prefixes(trial)
    text, must_stop = trial.grader.answer_target()
    target = codec.encode(text)
    stream = trial.ids[: ends[-1]]
    ids, pos, seg = list(stream), list(range(len(stream))), [-1] * len(stream)
    limit = list(range(1, len(stream) + 1))
    target_q, target_tok, stop_q = [], [], []
    for k, end in enumerate(ends):
        block = codec.forced_prefix(trial.ids[:end]) + target
        start, n_forced = len(ids), len(block) - len(target)
        ids += block
        pos += range(end, end + len(block))
        seg += [k] * len(block)
        limit += [end] * len(block)
        # The token at block offset r is predicted by offset r-1 (or by the stream's
        # last token before the boundary when r == 0).
        qpos = lambda r: start + r - 1 if r >= 1 else end - 1  # noqa: E731, B023  (called in this iteration only)
        target_q.append([qpos(n_forced + r) for r in range(len(target))])
        target_tok.append(target)
        stop_q.append(qpos(len(block)) if must_stop else -1)
    return _Packed(ids, pos, seg, limit, target_q, target_tok, stop_q)


def block_attention_mask(seg: torch.Tensor, limit: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention mask [R, 1, L, L] for packed rows.

    seg, limit: [R, L] (seg -2 on padding). Query q may attend key k iff k is a stream
    token with k < limit[q], or k is in q's own answer block with k <= q; a padding
    query attends itself only (its output is never read).
    """
    length = seg.shape[1]
    idx = torch.arange(length, device=seg.device)
    q_seg, k_seg = seg[:, :, None], seg[:, None, :]
    allowed = (k_seg == -1) & (idx[None, None, :] < limit[:, :, None])
    allowed |= (q_seg == k_seg) & (q_seg >= 0) & (idx[None, None, :] <= idx[None, :, None])
    allowed |= torch.eye(length, dtype=torch.bool, device=seg.device)[None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=seg.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def _final_logits(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head on selected hidden states [N, H] -> logits [N, V] (with final soft-capping if the model has it)."""
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


@register_estimator("likelihood")
@torch.no_grad()
def estimate_likelihood(model: torch.nn.Module, codec: StreamCodec, trials: list[Trial], opts: JOptions) -> list[np.ndarray]:
    """J at every boundary: P(meta-prover writes ``env.answer_target()`` | prefix + forced text), teacher-forced.

    Trials are packed as [stream | answer block 0 | answer block 1 | ...] and scored in
    one forward pass per ``opts.rows`` trials; the LM head runs only at the positions
    that predict target and stop tokens, so a large vocabulary costs no [R, L, V] tensor.
    """
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    stop_ids = codec.stop_ids.to(device)
    curves: list[np.ndarray] = []
    for s in range(0, len(trials), opts.rows):
        packs = [_pack(codec, t) for t in trials[s : s + opts.rows]]
        ids = pad_rows([p.ids for p in packs], codec.pad_id)[0].to(device)
        pos = pad_rows([p.pos for p in packs], 0)[0].to(device)
        seg = pad_rows([p.seg for p in packs], -2)[0].to(device)  # -2: padding, attends to nothing
        limit = pad_rows([p.limit for p in packs], 0)[0].to(device)
        mask = block_attention_mask(seg, limit, dtype)
        hidden = model.base_model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state
        # Gather every (row, query) whose prediction is read, score them in one LM-head call.
        rows, queries, tokens, owners = [], [], [], []  # owners: (trial in chunk, boundary, is_stop)
        for r, p in enumerate(packs):
            for k in range(len(p.stop_q)):
                rows += [r] * len(p.target_q[k])
                queries += p.target_q[k]
                tokens += p.target_tok[k]
                owners += [(r, k, False)] * len(p.target_q[k])
                if p.stop_q[k] >= 0:
                    rows.append(r)
                    queries.append(p.stop_q[k])
                    tokens.append(-1)
                    owners.append((r, k, True))
        logp = torch.log_softmax(_final_logits(model, hidden[torch.tensor(rows), torch.tensor(queries)]), -1)
        tok = torch.tensor(tokens, device=device)
        token_lp = logp.gather(-1, tok.clamp(min=0)[:, None]).squeeze(-1)
        stop_lp = torch.logsumexp(logp[:, stop_ids], -1)
        picked = torch.where(tok >= 0, token_lp, stop_lp).cpu().numpy().astype(np.float64)
        sums = [np.zeros(len(p.stop_q)) for p in packs]
        for (r, k, _), v in zip(owners, picked):
            sums[r][k] += v
        curves += [_with_outcome_so_far(t, np.exp(x)) for t, x in zip(trials[s : s + opts.rows], sums)]
    return curves


def _with_outcome_so_far(trial: Trial, p_target: np.ndarray) -> np.ndarray:
    """J at each boundary from P(target) [m]: the trial's outcome if forced to answer there
    is ``o_target`` when the meta-prover writes the canonical answer and, counting any
    other answer as none, ``o_none`` = outcome(episodes so far, no answer) otherwise, so
    J = o_none + P(target) * (o_target - o_none). For an outcome of the answer alone that
    is P(target); where earlier episodes count (planted_subseq), an episode that already
    holds the gold makes J 1."""
    grader = trial.grader
    target, _ = grader.answer_target()
    out = np.empty_like(p_target)
    for k, end in enumerate(boundary_prefixes(trial)):
        episodes = episodes_before(trial, end)
        o_none = float(grader.outcome(episodes, None))
        out[k] = o_none + p_target[k] * (grader.forced_outcome(episodes, target) - o_none)
    return out


class VerifierInput(NamedTuple):
    """What a verifier sees at one boundary: the problem's prompt, the episodes so far
    (texts, delimiters excluded) and the problem's grading (envs.base.ProblemGrader)."""

    prompt: str
    episodes: list[str]
    grader: object


TextVerifier = Callable[[list[VerifierInput]], np.ndarray]  # -> [N] estimated P(success) in [0, 1]
VERIFIERS = Registry("text verifier", "bonus.verifier")  # name -> factory: () -> TextVerifier
register_verifier = VERIFIERS.register


@register_verifier("episode_score")
def episode_score_verifier() -> TextVerifier:
    """Rule-based verifier: 1 if some episode so far already scores as correct under the
    problem's ``score_episode`` (e.g. its last number is the answer), else 0. It
    reads the reference through the problem's grader, like the outcome reward does."""

    def verify(items: list[VerifierInput]) -> np.ndarray:
        return np.array([float(any(it.grader.score_episode(e) >= 1.0 for e in it.episodes)) for it in items])

    return verify


def check_verifier_name(name: str) -> None:
    """``bonus.verifier`` must name a verifier of :data:`VERIFIERS` or the directory of a
    trained verifier saved by ``job=train_verifier`` (``RUN/verifier``)."""

    if name not in VERIFIERS and not is_saved_verifier(name):
        raise ValueError(
            f"bonus.verifier={name!r} is neither one of {sorted(VERIFIERS)} nor a saved verifier directory "
            "(written by `python train.py job=train_verifier` into RUN/verifier)"
        )


@register_estimator("verifier")
def estimate_verifier(model: torch.nn.Module, codec: StreamCodec, trials: list[Trial], opts: JOptions) -> list[np.ndarray]:
    """J at every boundary from the verifier ``opts.verifier``: a rule-based one of
    :data:`VERIFIERS` (one batched call over text) or a trained one saved in a directory
    (metarl_llm.verify.scoring.trained_verifier_estimator: one forward pass per trial, token in).
    The policy is not run."""
    check_verifier_name(opts.verifier)
    if opts.verifier not in VERIFIERS:
        return trained_verifier_estimator(model, codec, trials, opts)
    verify = VERIFIERS[opts.verifier]()
    items, sizes = [], []
    for t in trials:
        ends = boundary_prefixes(t)
        prompt = t.grader.problem.prompt
        items += [VerifierInput(prompt, t.episode_texts[:b], t.grader) for b in range(len(ends))]
        sizes.append(len(ends))
    values = np.asarray(verify(items), dtype=np.float64)
    if values.shape != (len(items),):
        raise ValueError(f"verifier {opts.verifier!r} returned shape {values.shape}; expected ({len(items)},)")
    if np.any(~np.isfinite(values)) or values.min(initial=0.0) < 0 or values.max(initial=0.0) > 1:
        raise ValueError(f"verifier {opts.verifier!r} returned values outside [0, 1]")
    return list(np.split(values, np.cumsum(sizes)[:-1]))


def progress(j_values: np.ndarray, clip: float | None = None) -> np.ndarray:
    """Per-episode progress J_j - J_{j-1} from J at [empty, after ep 0, after ep 1, ...]."""
    p = np.diff(np.asarray(j_values, dtype=np.float64))
    return np.clip(p, -clip, clip) if clip is not None else p


def j_curves(
    cfg: BonusConfig,
    model: torch.nn.Module,
    codec: StreamCodec,
    trials: list[Trial],
    answer_max_tokens: int,
    generator: torch.Generator | None = None,
    engine: Engine | None = None,
) -> list[np.ndarray]:
    """J at every boundary of every trial by ``cfg.estimator`` (with ``cfg.num_samples`` and
    ``cfg.verifier``): per trial an array [m_i], m_i its episodes, entry j J right before episode
    j (:func:`metarl_llm.rollout.meta_prover.boundary_prefixes`). What the bonus and MRT's
    termination baseline (``algo.advantage=termination``) are computed from."""
    opts = JOptions(
        num_samples=cfg.num_samples,
        answer_max_tokens=answer_max_tokens,
        generator=generator,
        verifier=cfg.verifier,
        engine=engine,
    )
    return get_estimator(cfg.estimator)(model, codec, trials, opts)


def episode_bonuses(
    cfg: BonusConfig,
    model: torch.nn.Module,
    codec: StreamCodec,
    trials: list[Trial],
    answer_max_tokens: int,
    generator: torch.Generator | None = None,
    outcomes: list[float] | None = None,
    engine: Engine | None = None,
) -> tuple[list[list[float]], list[np.ndarray] | None]:
    """Bonus of each episode of each trial, and the J curves they came from (None for ``none``).

    ``outcomes`` [B]: the outcome reward each trial is trained on, which J after the answer
    episode equals under ``bonus.final_episode=true`` (default: ``trial.outcome``, the
    environment's). With ``reward=verifier`` that is the verifier's reward, so that no
    reference-based outcome enters what is optimised. ``engine``: the rollout engine the sample
    estimator's meta-prover runs on (the run's ``rollout`` engine; None: a default cached one).
    """
    if cfg.name == "none":
        return [[] for _ in trials], None
    if cfg.name != "info_gain":
        raise ValueError(f"bonus.name={cfg.name!r}; expected 'none' or 'info_gain'")
    if outcomes is None:
        outcomes = [t.outcome for t in trials]
    if len(outcomes) != len(trials):
        raise ValueError(f"episode_bonuses: {len(outcomes)} outcomes for {len(trials)} trials")
    curves = j_curves(cfg, model, codec, trials, answer_max_tokens, generator, engine)
    if cfg.final_episode:
        # J after the committed answer is the rewarded outcome: the answer episode gets its
        # progress too and the bonuses telescope to alpha * (outcome - J_empty).
        bonuses = [list(cfg.alpha * progress(np.append(c, float(o)), cfg.clip)) for c, o in zip(curves, outcomes)]
    else:
        bonuses = [list(cfg.alpha * progress(c, cfg.clip)) for c in curves]
    return bonuses, curves
