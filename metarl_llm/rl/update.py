"""The PPO update: epochs over minibatches of a rollout batch, each forwarded in micro-batches.

With ``algo.micro_batch_tokens`` (a padded-token budget) or ``algo.length_bucket_tokens``
(rows of similar length grouped, :func:`update_passes`) a minibatch is forwarded in
micro-batches whose losses are weighted by their share of the minibatch's action tokens,
so the accumulated gradient is the whole minibatch's token-mean gradient.
"""

from __future__ import annotations

import contextlib
import math

import torch

from metarl_llm.config import AlgoConfig
from metarl_llm.core.batch import RolloutBatch, length_buckets
from metarl_llm.models import autocast
from metarl_llm.rl.losses import clipped_value_loss, get_policy_loss, kl_k2, kl_k3, masked_mean


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
    is 0; else rows grouped by length (:func:`metarl_llm.core.batch.length_buckets`), each pass
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

    Data parallel (``dist``, a :class:`metarl_llm.runtime.distributed.Dist` of world W > 1, with
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
                    scores = actor_critic(
                        mb.input_ids, mb.attention_mask, with_values=use_critic, with_entropy=True, positions=mask.bool()
                    )  # the LM head at action tokens only, in chunks (models.causal_lm_scores)
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
                    raise FloatingPointError(
                        f"non-finite PPO loss {loss.item()} (policy {pg_loss.item()}, value {value_loss.item()})"
                    )
                # on_nonfinite=skip: the backward still runs (a data-parallel wrapper needs every
                # process's backward); the NaN reaches the gradient norm and the step is skipped.
                (loss * (share * world)).backward()  # the wrapper averages over the W processes
                no_sync.close()
                values = {
                    "loss/policy": pg_loss,
                    "loss/value": value_loss,
                    "loss/kl": kl_loss,
                    "kl_k3": kl,
                    "entropy": entropy,
                    **stats,
                }
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
                    raise FloatingPointError(
                        f"non-finite gradient norm {step['grad_norm']} (algo.on_nonfinite=skip drops such steps)"
                    )
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
