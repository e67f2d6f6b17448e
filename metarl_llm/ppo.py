"""PPO over token streams: registered policy losses, the clipped value loss, the update.

All losses are token means over the action tokens of a minibatch ([B, T] tensors,
``mask`` = action_mask); prompt and observation tokens never enter a loss.

With ``algo.micro_batch_tokens`` (a padded-token budget) or ``algo.length_bucket_tokens``
(rows of similar length grouped, :func:`update_passes`) a minibatch is forwarded in
micro-batches whose losses are weighted by their share of the minibatch's action tokens,
so the accumulated gradient is the whole minibatch's token-mean gradient.
"""

from __future__ import annotations

import contextlib
import math

from typing import Callable

import torch

from metarl_llm.batch import RolloutBatch, length_buckets
from metarl_llm.config import AlgoConfig
from metarl_llm.models import autocast

LossFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
POLICY_LOSSES: dict[str, LossFn] = {}


def register_policy_loss(name: str) -> Callable[[LossFn], LossFn]:
    def wrap(fn: LossFn) -> LossFn:
        POLICY_LOSSES[name] = fn
        return fn

    return wrap


def get_policy_loss(name: str) -> LossFn:
    if name not in POLICY_LOSSES:
        raise ValueError(f"algo.policy_loss={name!r} is not registered; choose from {sorted(POLICY_LOSSES)}")
    return POLICY_LOSSES[name]


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


@register_policy_loss("ppo_clip")
def ppo_clip(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *, clip_eps: float, **_
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """-min(rho * A, clip(rho, 1-eps, 1+eps) * A), rho = pi / pi_old, token mean.

    Stats: ``clipfrac`` (share of tokens where the clipped term was taken) and
    ``approx_kl`` (mean of (rho - 1) - log rho, an unbiased KL(pi_old || pi) estimate).
    """
    log_ratio = logprobs - old_logprobs
    ratio = log_ratio.exp()
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages
    loss = masked_mean(-torch.minimum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped < unclipped).float(), mask),
            "approx_kl": masked_mean((ratio - 1) - log_ratio, mask),
        }
    return loss, stats


@register_policy_loss("reinforce")
def reinforce(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, **_
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Plain policy gradient, -A * log pi, token mean (no ratio, no clipping)."""
    loss = masked_mean(-advantages * logprobs, mask)
    with torch.no_grad():
        log_ratio = logprobs - old_logprobs
        stats = {"clipfrac": torch.zeros(()), "approx_kl": masked_mean(log_ratio.exp() - 1 - log_ratio, mask)}
    return loss, stats


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float
) -> torch.Tensor:
    """0.5 * max((V - R)^2, (V_clipped - R)^2), V_clipped = V_old + clip(V - V_old, -c, c)."""
    v_clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (v_clipped - returns) ** 2), mask)


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref): exp(d) - d - 1 with d = ref - logprob (>= 0).

    Its *value* is an unbiased, non-negative, low-variance estimate of KL(pi || ref) on
    tokens sampled from pi, so it is what the update logs. It is not the loss: its expected
    gradient is that of KL(ref || pi) (E_pi[(1 - ref/pi) grad log pi] = -sum_x ref(x) grad log pi(x)),
    the reverse direction.
    """
    d = ref_logprobs - logprobs
    return d.exp() - d - 1


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k2 = 0.5 * (logprob - ref)^2: the KL loss term of the update.

    On tokens sampled from pi its expected gradient is the gradient of KL(pi || ref):
    E_pi[(log pi - log ref) grad log pi] = grad sum_x pi(x) (log pi(x) - log ref(x)), since
    E_pi[grad log pi] = 0. (k1 = log pi - log ref has the right gradient only as a reward,
    ``algo.kl_in_reward=true``; as a loss its expected gradient is 0. k3's is KL(ref || pi)'s.)
    tests/test_ppo_kl.py checks both against an exact KL on a small vocabulary.
    """
    return 0.5 * (logprobs - ref_logprobs) ** 2


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R) over action tokens (1: perfect critic, <= 0: no better than a constant)."""
    var_r = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    resid = returns - values
    var_e = masked_mean((resid - masked_mean(resid, mask)) ** 2, mask)
    return float(1 - var_e / var_r) if var_r > 0 else float("nan")


def micro_batches(lengths: torch.Tensor, budget: int) -> list[torch.Tensor]:
    """Split the rows of a minibatch into micro-batches of at most ``budget`` padded tokens.

    lengths [n] (real tokens of each right-padded row) -> index tensors into those rows,
    together a partition of ``range(n)``. The padded size of a micro-batch is its number
    of rows times its longest row (each micro-batch is trimmed to its own longest
    stream). Rows are taken longest first and packed greedily: a row that would take the
    current micro-batch over ``budget`` starts the next one. A single row longer than
    ``budget`` is a micro-batch of its own (a stream is never cut), so such a micro-batch
    exceeds the budget. ``budget`` 0: one micro-batch of all rows, in their order.
    """
    if budget < 0:
        raise ValueError(f"algo.micro_batch_tokens must be >= 0, got {budget}")
    n = lengths.shape[0]
    if budget == 0 or n == 0:
        return [torch.arange(n)]
    order = torch.argsort(lengths, descending=True, stable=True)
    sizes = lengths[order].tolist()
    parts, start = [], 0
    for k in range(1, n + 1):  # one step per row: longest first, so a part's width is its first row's length
        if k == n or (k - start + 1) * sizes[start] > budget:
            parts.append(order[start:k])
            start = k
    return parts


def update_passes(lengths: torch.Tensor, budget: int, bucket_tokens: int) -> list[torch.Tensor]:
    """The forward/backward passes of one minibatch: :func:`micro_batches` under the token
    ``budget`` (``algo.micro_batch_tokens``) when ``bucket_tokens`` (``algo.length_bucket_tokens``)
    is 0; else rows grouped by length (:func:`metarl_llm.batch.length_buckets`), each pass
    within the budget too."""
    if budget < 0:
        raise ValueError(f"algo.micro_batch_tokens must be >= 0, got {budget}")
    if bucket_tokens == 0:
        return micro_batches(lengths, budget)
    return length_buckets(lengths, bucket_tokens, max_tokens=budget)


def ppo_update(
    actor_critic: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: RolloutBatch,
    cfg: AlgoConfig,
    generator: torch.Generator,
    use_critic: bool,
    *,
    amp_dtype: torch.dtype | None = None,
    dist=None,
) -> dict[str, float]:
    """``cfg.ppo_epochs`` passes of shuffled minibatches over one rollout batch.

    Each minibatch of ``cfg.minibatch_size`` trials is one optimiser step. Its forward and
    backward passes run in micro-batches of at most ``cfg.micro_batch_tokens`` padded
    tokens (:func:`micro_batches`; 0: no budget; a single trial longer than the budget is a
    micro-batch of its own); with ``cfg.length_bucket_tokens`` > 0 the micro-batches group
    rows of similar length (:func:`update_passes`), so that short rows are not padded to
    the longest. Each micro-batch's losses (token means
    over its own action tokens) are weighted by its share n_micro / n_minibatch of the
    minibatch's action tokens before ``backward``, so the accumulated gradient equals the
    gradient of the whole minibatch's token-mean loss; then the gradient norm is clipped
    and the optimiser steps once. ``amp_dtype``: run the forward passes under
    ``torch.autocast`` with this dtype (None: no autocast); losses are float32.

    Data parallel (``dist``, a :class:`metarl_llm.distributed.Dist` of world W > 1, with
    ``actor_critic`` wrapped by DDP/FSDP through accelerate and ``batch`` the *global*
    batch on every process): every process draws the same minibatch order and forwards
    its strided share ``rows[rank::W]`` of each minibatch; shares are weighted by
    W * n_share / n_minibatch, so the wrapper's gradient average is the single-process
    gradient of the whole minibatch; only the last backward of a step synchronises. The
    returned statistics are summed over processes: the single-process figures.

    Returns the means over minibatches of: ``loss/policy``, ``loss/value``,
    ``loss/kl`` (the k2 loss term, :func:`kl_k2`), ``kl_k3`` (the k3 estimate of KL(pi || ref),
    :func:`kl_k3`, the logged value), ``entropy``, ``clipfrac``,
    ``approx_kl``, ``grad_norm`` over the steps taken; plus ``update_tokens`` (real tokens
    forwarded) and ``nonfinite_skipped`` (steps dropped for a non-finite loss or gradient
    norm under ``cfg.on_nonfinite="skip"``; with "raise" such a step raises
    FloatingPointError).
    """
    loss_fn = get_policy_loss(cfg.policy_loss)
    device = next(actor_critic.parameters()).device
    b = batch.input_ids.shape[0]
    lengths = batch.attention_mask.sum(1)
    sums: dict[str, float] = {}
    steps = 0
    skipped = 0  # optimiser steps dropped for a non-finite loss or gradient (on_nonfinite=skip)
    tokens = 0
    params = [p for g in optimizer.param_groups for p in g["params"]]
    world = dist.world if dist is not None else 1
    for _epoch in range(cfg.ppo_epochs):
        perm = torch.randperm(b, generator=generator)
        for start in range(0, b, cfg.minibatch_size):
            rows = perm[start : start + cfg.minibatch_size]
            # The minibatch's action tokens: the denominator of its token-mean losses.
            n_minibatch = batch.action_mask[rows].sum().clamp(min=1)
            optimizer.zero_grad(set_to_none=True)
            step: dict[str, float] = {}
            mine = rows[dist.rank :: world] if world > 1 else rows
            joins = len(mine) > 0  # a process without rows still joins the gradient average, with weight 0
            parts = update_passes(lengths[mine if joins else rows[:1]], cfg.micro_batch_tokens, cfg.length_bucket_tokens)
            for k_part, part in enumerate(parts):
                mb = batch.select((mine if joins else rows[:1])[part])  # trimmed to this micro-batch's longest stream
                mb = RolloutBatch(*(f.to(device) for f in mb))
                mask = mb.action_mask
                share = float(mask.sum().cpu() / n_minibatch) if joins else 0.0  # weight of this micro-batch's token means
                sync = world == 1 or k_part == len(parts) - 1 or not hasattr(actor_critic, "no_sync")
                no_sync = contextlib.ExitStack()  # DDP: forward and backward of all but the last micro-batch skip the all-reduce
                if not sync:
                    no_sync.enter_context(actor_critic.no_sync())
                with autocast(device, amp_dtype):
                    # forward (not .score) so that a data-parallel wrapper sees the call
                    scores = actor_critic(mb.input_ids, mb.attention_mask, with_values=use_critic, with_entropy=True)
                # Stored old/ref log-probs are 0 off action tokens; zero the new ones there too so
                # that an extreme log-prob on a masked token cannot overflow into inf * 0 = NaN.
                logprobs = scores.logprobs * mask
                pg_loss, stats = loss_fn(logprobs, mb.logprobs, mb.advantages, mask, clip_eps=cfg.clip_eps)
                loss = pg_loss
                value_loss = torch.zeros((), device=device)
                if use_critic:
                    value_loss = clipped_value_loss(scores.values, mb.values, mb.returns, mask, cfg.value_clip)
                    loss = loss + cfg.vf_coef * value_loss
                kl_loss = masked_mean(kl_k2(logprobs, mb.ref_logprobs), mask)  # the loss: gradient of KL(pi || ref)
                with torch.no_grad():
                    kl = masked_mean(kl_k3(logprobs, mb.ref_logprobs), mask)  # the logged value: KL(pi || ref), k3
                if cfg.kl_coef and not cfg.kl_in_reward:
                    loss = loss + cfg.kl_coef * kl_loss
                entropy = masked_mean(scores.entropy, mask)
                if cfg.ent_coef:
                    loss = loss - cfg.ent_coef * entropy
                if not torch.isfinite(loss) and cfg.on_nonfinite != "skip":
                    raise FloatingPointError(f"non-finite PPO loss {loss.item()} (policy {pg_loss.item()}, value {value_loss.item()})")
                # on_nonfinite=skip: the backward still runs (a data-parallel wrapper needs every
                # process's backward); the NaN reaches the gradient norm and the step is skipped.
                (loss * (share * world)).backward()  # the wrapper averages over the W processes
                no_sync.close()
                values = {"loss/policy": pg_loss, "loss/value": value_loss, "loss/kl": kl_loss, "kl_k3": kl, "entropy": entropy,
                          **stats}
                for k, v in values.items():
                    step[k] = step.get(k, 0.0) + share * float(v.detach() if torch.is_tensor(v) else v)
                tokens += int(mb.attention_mask.sum())
            if world > 1:  # each process holds its share's token-weighted sums: add them up
                names = sorted(step)
                summed = dist.all_sum(torch.tensor([step[k] for k in names], dtype=torch.float64))
                step = dict(zip(names, summed.tolist()))
            step["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
            if not math.isfinite(step["grad_norm"]):
                if cfg.on_nonfinite != "skip":
                    raise FloatingPointError(f"non-finite gradient norm {step['grad_norm']} (algo.on_nonfinite=skip drops such steps)")
                optimizer.zero_grad(set_to_none=True)  # the step is dropped, not taken
                skipped += 1
                continue
            optimizer.step()
            for k, v in step.items():
                sums[k] = sums.get(k, 0.0) + v
            steps += 1
    out = {k: v / max(steps, 1) for k, v in sums.items()}
    out["nonfinite_skipped"] = skipped
    out["update_tokens"] = tokens
    return out
