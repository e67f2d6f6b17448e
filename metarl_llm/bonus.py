"""Dense per-episode bonuses (DESIGN.md section 6).

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

from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np
import torch

from envs.base import EnvironmentFailure
from metarl_llm.config import BonusConfig
from metarl_llm.rollout import StreamCodec, Trial, sample


@dataclass
class JOptions:
    """Settings shared by the estimators (each reads the ones it needs)."""

    num_samples: int = 4  # sample: meta-prover answers per boundary
    answer_max_tokens: int = 12  # sample: tokens per meta-prover answer
    generator: torch.Generator | None = None  # sample: RNG of the meta-prover answers
    verifier: str = "episode_score"  # verifier: name in VERIFIERS
    rows: int = 32  # likelihood: trials per forward pass


Estimator = Callable[[torch.nn.Module, StreamCodec, list[Trial], JOptions], list[np.ndarray]]
ESTIMATORS: dict[str, Estimator] = {}


def register_estimator(name: str) -> Callable[[Estimator], Estimator]:
    def wrap(fn: Estimator) -> Estimator:
        ESTIMATORS[name] = fn
        return fn

    return wrap


def get_estimator(name: str) -> Estimator:
    if name not in ESTIMATORS:
        raise ValueError(f"bonus.estimator={name!r} is not available; choose from {sorted(ESTIMATORS)}")
    return ESTIMATORS[name]


def boundary_prefixes(trial: Trial) -> list[int]:
    """Stream lengths of the prefixes at which J is measured: after the prompt, then
    after each episode before the final-answer one.

    The boundary of episode j lies *after* the observation the environment inserted in
    reply to it (feedback such as ``[wrong]``), so that J_j already holds the
    information that reply carries and the progress it brings is credited to episode j,
    which earned it, not to episode j+1. The exception is an inserted forced-answer text:
    the meta-prover appends that itself, so the boundary stays before it.
    """
    prompt_len = trial.action.index(1) if 1 in trial.action else len(trial.ids)
    n = trial.answer_episode if trial.answer_episode >= 0 else len(trial.episode_ends)
    starts = episode_starts(trial)
    ends = [prompt_len]
    for j in range(n):
        forced_next = trial.forced and j + 1 == trial.answer_episode  # the observation is the forced-answer text
        ends.append(starts[j + 1] if j + 1 < len(starts) and not forced_next else trial.episode_ends[j] + 1)
    return ends


def episode_starts(trial: Trial) -> list[int]:
    """Stream position of each episode's first token (episodes are contiguous runs of action tokens)."""
    idx = np.flatnonzero(np.asarray(trial.action, dtype=bool))
    ep = np.asarray(trial.episode, dtype=np.int64)[idx]
    return idx[np.r_[True, ep[1:] != ep[:-1]]].tolist() if len(idx) else []


def episodes_before(trial: Trial, end: int) -> list[str]:
    """Texts of the trial's episodes that lie wholly inside the prefix ``trial.ids[:end]``."""
    return [text for text, last in zip(trial.episode_texts, trial.episode_ends) if last < end]


def meta_prover_context(codec: StreamCodec, trial: Trial, end: int) -> list[int]:
    """The stream up to ``end`` followed by the forced-answer tokens: what the meta-prover sees."""
    return trial.ids[:end] + codec.forced_prefix(trial.ids[:end])


def meta_prover_success(
    model: torch.nn.Module, codec: StreamCodec, trials: list[Trial], ends: list[list[int]], num_samples: int,
    answer_max_tokens: int, generator: torch.Generator | None = None,
) -> list[np.ndarray]:
    """J after the prefixes ``ends[i]`` (stream lengths) of trial i: the mean success of
    ``num_samples`` meta-prover answers of at most ``answer_max_tokens`` tokens, all from
    one batched sampling call over the trials' own token ids. Each answer is scored as
    the trial would be if forced to answer there: ``env.forced_outcome(episodes so far,
    answer)`` (where the outcome counts earlier episodes, as planted_subseq's does, an
    episode that already holds the gold makes J 1 whatever the answer). Returns one array
    [len(ends[i])] per trial. Trials that kept the rollout's KV cache for ``model``
    (``run_trials(..., keep_cache=True)``) are continued from it instead of re-encoded.
    Either way the answers are ancestral samples from ``generator``."""
    if trials and all(t.cache is not None and t.cache.model_id == id(model) for t in trials):
        # The rollout kept each trial's KV cache (engine "cached", keep_cache=True) for this
        # very model: continue every prefix from it, encoding only the forced-answer tokens.
        from metarl_llm.engine import CachedEngine

        suffixes = [[codec.forced_prefix(t.ids[:end]) for end in prefix_ends] for t, prefix_ends in zip(trials, ends)]
        tokens, lengths, owners = CachedEngine().continue_prefixes(
            model, trials, ends, suffixes, num_samples, answer_max_tokens, codec.stop_ids, codec.pad_id, generator)
    else:
        contexts, owners = [], []
        for i, (t, prefix_ends) in enumerate(zip(trials, ends)):
            for b, end in enumerate(prefix_ends):
                contexts += [meta_prover_context(codec, t, end)] * num_samples
                owners += [(i, b)] * num_samples
        out = sample(model, contexts, answer_max_tokens, codec.stop_ids, codec.pad_id, generator)
        tokens, lengths = out.tokens, out.lengths
    sums = [np.zeros(len(prefix_ends)) for prefix_ends in ends]
    before = [[episodes_before(t, end) for end in prefix_ends] for t, prefix_ends in zip(trials, ends)]
    for row, (i, b) in enumerate(owners):
        text = codec.episode_text(tokens[row, : int(lengths[row])].tolist())
        try:
            sums[i][b] += trials[i].env.forced_outcome(before[i][b], text)
        except Exception as e:  # noqa: BLE001 - a grader failure is loud, with the problem and the text
            raise EnvironmentFailure(trials[i].problem_id, text, b, e) from e
    return [x / num_samples for x in sums]


@register_estimator("sample")
def estimate_sample(model: torch.nn.Module, codec: StreamCodec, trials: list[Trial], opts: JOptions) -> list[np.ndarray]:
    """J at every boundary of every trial: the mean score of ``num_samples`` meta-prover
    answers (all boundaries of all trials in one batched sampling call)."""
    ends = [boundary_prefixes(t) for t in trials]
    return meta_prover_success(model, codec, trials, ends, opts.num_samples, opts.answer_max_tokens, opts.generator)


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
    text, must_stop = trial.env.answer_target()
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
        qpos = lambda r: start + r - 1 if r >= 1 else end - 1  # noqa: E731
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
        length = max(len(p.ids) for p in packs)
        pad = lambda xs, v: xs + [v] * (length - len(xs))  # noqa: E731
        ids = torch.tensor([pad(p.ids, codec.pad_id) for p in packs], device=device)
        pos = torch.tensor([pad(p.pos, 0) for p in packs], device=device)
        seg = torch.tensor([pad(p.seg, -2) for p in packs], device=device)
        limit = torch.tensor([pad(p.limit, 0) for p in packs], device=device)
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
    env = trial.env
    target, _ = env.answer_target()
    out = np.empty_like(p_target)
    for k, end in enumerate(boundary_prefixes(trial)):
        episodes = episodes_before(trial, end)
        o_none = float(env.outcome(episodes, None))
        out[k] = o_none + p_target[k] * (env.forced_outcome(episodes, target) - o_none)
    return out


class VerifierInput(NamedTuple):
    """What a verifier sees at one boundary: the problem's prompt, the episodes so far
    (texts, delimiters excluded) and the environment holding the problem."""

    prompt: str
    episodes: list[str]
    env: object


Verifier = Callable[[list[VerifierInput]], np.ndarray]  # -> [N] estimated P(success) in [0, 1]
VERIFIERS: dict[str, Callable[[], Verifier]] = {}  # name -> factory


def register_verifier(name: str):
    def wrap(factory: Callable[[], Verifier]) -> Callable[[], Verifier]:
        VERIFIERS[name] = factory
        return factory

    return wrap


@register_verifier("episode_score")
def episode_score_verifier() -> Verifier:
    """Rule-based verifier: 1 if some episode so far already scores as correct under the
    environment's ``score_episode`` (e.g. its last number is the answer), else 0. It
    reads the reference through the environment, like the outcome reward does."""

    def verify(items: list[VerifierInput]) -> np.ndarray:
        return np.array([float(any(it.env.score_episode(e) >= 1.0 for e in it.episodes)) for it in items])

    return verify


def check_verifier_name(name: str) -> None:
    """``bonus.verifier`` must name a verifier of :data:`VERIFIERS` or the directory of a
    trained verifier saved by ``algo=verifier`` (``RUN/verifier``)."""
    from metarl_llm.verifier import is_saved_verifier  # verifier imports this module

    if name not in VERIFIERS and not is_saved_verifier(name):
        raise ValueError(f"bonus.verifier={name!r} is neither one of {sorted(VERIFIERS)} nor a saved verifier directory "
                         "(written by `python train.py algo=verifier` into RUN/verifier)")


@register_estimator("verifier")
def estimate_verifier(model: torch.nn.Module, codec: StreamCodec, trials: list[Trial], opts: JOptions) -> list[np.ndarray]:
    """J at every boundary from the verifier ``opts.verifier``: a rule-based one of
    :data:`VERIFIERS` (one batched call over text) or a trained one saved in a directory
    (metarl_llm.verifier.trained_verifier_estimator: one forward pass per trial, token in).
    The policy is not run."""
    check_verifier_name(opts.verifier)
    if opts.verifier not in VERIFIERS:
        from metarl_llm.verifier import trained_verifier_estimator

        return trained_verifier_estimator(model, codec, trials, opts)
    verify = VERIFIERS[opts.verifier]()
    items, sizes = [], []
    for t in trials:
        ends = boundary_prefixes(t)
        prompt = t.env.problem.prompt
        items += [VerifierInput(prompt, t.episode_texts[:b], t.env) for b in range(len(ends))]
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


def episode_bonuses(
    cfg: BonusConfig,
    model: torch.nn.Module,
    codec: StreamCodec,
    trials: list[Trial],
    answer_max_tokens: int,
    generator: torch.Generator | None = None,
    outcomes: list[float] | None = None,
) -> tuple[list[list[float]], list[np.ndarray] | None]:
    """Bonus of each episode of each trial, and the J curves they came from (None for ``none``).

    ``outcomes`` [B]: the outcome reward each trial is trained on, which J after the answer
    episode equals under ``bonus.final_episode=true`` (default: ``trial.outcome``, the
    environment's). With ``reward=verifier`` that is the verifier's reward, so that no
    reference-based outcome enters what is optimised.
    """
    if cfg.name == "none":
        return [[] for _ in trials], None
    if cfg.name != "info_gain":
        raise ValueError(f"bonus.name={cfg.name!r}; expected 'none' or 'info_gain'")
    if outcomes is None:
        outcomes = [t.outcome for t in trials]
    if len(outcomes) != len(trials):
        raise ValueError(f"episode_bonuses: {len(outcomes)} outcomes for {len(trials)} trials")
    estimate = get_estimator(cfg.estimator)
    opts = JOptions(num_samples=cfg.num_samples, answer_max_tokens=answer_max_tokens, generator=generator, verifier=cfg.verifier)
    curves = estimate(model, codec, trials, opts)
    if cfg.final_episode:
        # J after the committed answer is the rewarded outcome: the answer episode gets its
        # progress too and the bonuses telescope to alpha * (outcome - J_empty).
        bonuses = [list(cfg.alpha * progress(np.append(c, float(o)), cfg.clip)) for c, o in zip(curves, outcomes)]
    else:
        bonuses = [list(cfg.alpha * progress(c, cfg.clip)) for c in curves]
    return bonuses, curves
