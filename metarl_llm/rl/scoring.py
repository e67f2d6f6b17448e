"""Scoring a rollout batch: the sampling policy's log-probs and values and the frozen reference's
log-probs ([B, T], 0 off action tokens), and the verifier's reward for ``reward=verifier``.
"""

from __future__ import annotations

import logging

import torch

import envs  # noqa: F401  (registers the environments)
from metarl_llm.config import OldLogprobs
from metarl_llm.core.batch import RolloutBatch, length_buckets
from metarl_llm.models import (
    ActorCritic,
    autocast,
    causal_lm_scores,
)
from metarl_llm.verify.scoring import score_trials

log = logging.getLogger(__name__)


OLD_LOGPROBS = tuple(m.value for m in OldLogprobs)  # ("recompute", "sampled")


@torch.no_grad()
def score_batch(
    actor_critic: ActorCritic,
    reference: torch.nn.Module,
    batch: RolloutBatch,
    use_critic: bool,
    rows: int = 64,
    amp_dtype: torch.dtype | None = None,
    *,
    sampling: torch.Tensor | None = None,
    old_logprobs: str = "recompute",
    bucket_tokens: int = 0,
    stats: dict | None = None,
    sampled_values: torch.Tensor | None = None,
) -> RolloutBatch:
    """Fill ``logprobs``, ``values`` (sampling policy) and ``ref_logprobs`` (reference), [B, T]
    float32, 0 off action tokens. ``amp_dtype``: the forward passes run under that autocast.

    Forward passes take at most ``rows`` rows. With ``bucket_tokens`` > 0
    (``algo.length_bucket_tokens``) rows of similar length share a pass
    (:func:`metarl_llm.core.batch.length_buckets`), each pass trimmed to its own longest row;
    the results are put back in the batch's row order (0 on padding, as before).

    ``sampling`` [B, T]: the rollout engine's own log-probs of the sampled tokens
    (:func:`metarl_llm.core.batch.sampled_logprobs`). ``old_logprobs`` (``algo.old_logprobs``):
    ``recompute`` fills ``logprobs`` from a forward pass of the policy; ``sampled`` uses
    ``sampling`` (needed then) and runs the policy's forward only when values are needed
    (``use_critic``; its log-probs then feed the check below only) and not given as
    ``sampled_values`` [B, T] (:func:`metarl_llm.core.batch.sampled_values`: a shared critic's
    values computed by the rollout engine while sampling; only with ``old_logprobs='sampled'``
    and ``use_critic``): then no policy forward runs at all, only the reference's.
    ``stats``: a dict that receives ``logprob_mismatch_max``, the largest |forward - sampling|
    log-prob over action tokens: NaN when the policy's forward was skipped or ``sampling`` is None.
    """
    if old_logprobs not in OLD_LOGPROBS:
        raise ValueError(f"algo.old_logprobs={old_logprobs!r}; expected one of {OLD_LOGPROBS}")
    if old_logprobs == "sampled" and sampling is None:
        raise ValueError("score_batch: old_logprobs='sampled' needs the sampling log-probs (sampling=...)")
    if sampled_values is not None:
        if old_logprobs != "sampled" or not use_critic:
            raise ValueError(
                f"score_batch: sampled_values replace the policy forward's values only with "
                f"old_logprobs='sampled' and a critic (got old_logprobs={old_logprobs!r}, use_critic={use_critic})"
            )
        if sampled_values.shape != batch.input_ids.shape:
            raise ValueError(
                f"score_batch: sampled_values of shape {tuple(sampled_values.shape)}, the batch is {tuple(batch.input_ids.shape)}"
            )
    device = next(actor_critic.parameters()).device
    policy_forward = old_logprobs == "recompute" or (use_critic and sampled_values is None)
    b, t = batch.input_ids.shape
    lp, vals, ref = torch.zeros((b, t)), torch.zeros((b, t)), torch.zeros((b, t))
    lengths = batch.attention_mask.sum(1)
    for part in length_buckets(lengths, bucket_tokens, max_rows=rows):
        width = max(1, int(lengths[part].max()))
        ids = batch.input_ids[part, :width].to(device)
        am = batch.attention_mask[part, :width].to(device)
        acts = batch.action_mask[part, :width].to(device).bool()  # only action tokens are scored: no [B, T, V] logits
        with autocast(device, amp_dtype):
            if policy_forward:
                out = actor_critic.score(ids, am, with_values=use_critic, positions=acts)
            ref_lp = causal_lm_scores(reference, ids, am, acts).logprobs
        if policy_forward:
            lp[part, :width] = out.logprobs.float().cpu()
            vals[part, :width] = out.values.float().cpu()
        ref[part, :width] = ref_lp.cpu()
    mask = batch.action_mask
    if stats is not None:
        stats["logprob_mismatch_max"] = (
            float(((lp - sampling).abs() * mask).max()) if policy_forward and sampling is not None and b else float("nan")
        )
    logprobs = sampling * mask if old_logprobs == "sampled" else lp * mask
    if sampled_values is not None:
        vals = sampled_values.float()
    return batch._replace(logprobs=logprobs, values=vals * mask, ref_logprobs=ref * mask)


@torch.no_grad()
def verifier_rewards(verifier, trials: list, rows: int) -> torch.Tensor:
    """reward=verifier: the verifier's P(success) of each whole trial, [B] float32 in [0, 1]."""

    return torch.as_tensor(score_trials(verifier, trials, rows=rows), dtype=torch.float32)
