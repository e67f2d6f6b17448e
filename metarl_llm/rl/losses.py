"""Registered policy losses (``algo.policy_loss``), the clipped value loss and the KL terms.

All losses are token means over the action tokens of a minibatch ([B, T] tensors,
``mask`` = action_mask); prompt and observation tokens never enter a loss.
"""

from __future__ import annotations

from typing import Callable

import torch

from metarl_llm.core.registry import Registry

LossFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
POLICY_LOSSES = Registry("policy loss", "algo.policy_loss")  # name -> LossFn
register_policy_loss = POLICY_LOSSES.register
get_policy_loss = POLICY_LOSSES.lookup


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
    tests/rl/test_ppo_kl.py checks both against an exact KL on a small vocabulary.
    """
    return 0.5 * (logprobs - ref_logprobs) ** 2


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R) over action tokens (1: perfect critic, <= 0: no better than a constant)."""
    var_r = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    resid = returns - values
    var_e = masked_mean((resid - masked_mean(resid, mask)) ** 2, mask)
    return float(1 - var_e / var_r) if var_r > 0 else float("nan")
