"""PPO over token streams: registered policy losses, the clipped value loss, the update.

All losses are token means over the action tokens of a minibatch ([B, T] tensors,
``mask`` = action_mask); prompt and observation tokens never enter a loss.
"""

from __future__ import annotations

from typing import Callable

import torch

from metarl_llm.advantages import whiten
from metarl_llm.batch import RolloutBatch
from metarl_llm.config import AlgoConfig

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
    """Per-token k3 estimate of KL(pi || pi_ref): exp(d) - d - 1 with d = ref - logprob (>= 0)."""
    d = ref_logprobs - logprobs
    return d.exp() - d - 1


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R) over action tokens (1: perfect critic, <= 0: no better than a constant)."""
    var_r = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    resid = returns - values
    var_e = masked_mean((resid - masked_mean(resid, mask)) ** 2, mask)
    return float(1 - var_e / var_r) if var_r > 0 else float("nan")


def ppo_update(
    actor_critic: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: RolloutBatch,
    cfg: AlgoConfig,
    generator: torch.Generator,
    use_critic: bool,
) -> dict[str, float]:
    """``cfg.ppo_epochs`` passes of shuffled minibatches over one rollout batch.

    Returns the means over minibatches of: ``loss/policy``, ``loss/value``,
    ``loss/kl`` (k3, against the reference), ``entropy``, ``clipfrac``,
    ``approx_kl``, ``grad_norm``; plus ``update_tokens`` (tokens forwarded).
    """
    loss_fn = get_policy_loss(cfg.policy_loss)
    device = next(actor_critic.parameters()).device
    advantages = batch.advantages
    if cfg.whiten_advantages:
        advantages = whiten(advantages, batch.action_mask)
    batch = batch._replace(advantages=advantages)
    b = batch.input_ids.shape[0]
    sums: dict[str, float] = {}
    steps = 0
    tokens = 0
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for _epoch in range(cfg.ppo_epochs):
        perm = torch.randperm(b, generator=generator)
        for start in range(0, b, cfg.minibatch_size):
            mb = batch.select(perm[start : start + cfg.minibatch_size])
            mb = RolloutBatch(*(f.to(device) for f in mb))
            mask = mb.action_mask
            scores = actor_critic.score(mb.input_ids, mb.attention_mask, with_values=use_critic, with_entropy=True)
            # Stored old/ref log-probs are 0 off action tokens; zero the new ones there too so
            # that an extreme log-prob on a masked token cannot overflow into inf * 0 = NaN.
            logprobs = scores.logprobs * mask
            pg_loss, stats = loss_fn(logprobs, mb.logprobs, mb.advantages, mask, clip_eps=cfg.clip_eps)
            loss = pg_loss
            value_loss = torch.zeros((), device=device)
            if use_critic:
                value_loss = clipped_value_loss(scores.values, mb.values, mb.returns, mask, cfg.value_clip)
                loss = loss + cfg.vf_coef * value_loss
            kl = masked_mean(kl_k3(logprobs, mb.ref_logprobs), mask)
            if cfg.kl_coef and not cfg.kl_in_reward:
                loss = loss + cfg.kl_coef * kl
            entropy = masked_mean(scores.entropy, mask)
            if cfg.ent_coef:
                loss = loss - cfg.ent_coef * entropy
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite PPO loss {loss.item()} (policy {pg_loss.item()}, value {value_loss.item()})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            values = {
                "loss/policy": pg_loss, "loss/value": value_loss, "loss/kl": kl, "entropy": entropy,
                "grad_norm": grad_norm, **stats,
            }
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v)
            steps += 1
            tokens += int(mb.attention_mask.sum())
    out = {k: v / max(steps, 1) for k, v in sums.items()}
    out["update_tokens"] = tokens
    return out
