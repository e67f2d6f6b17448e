"""The KL term of the PPO loss has the gradient of KL(pi || ref) (issue 15, item 5).

On a small vocabulary every token can be enumerated, so the estimator's *expected*
gradient under x ~ pi, sum_x pi(x) grad k(x) with pi(x) held fixed (the sample is not
differentiated through), is computed exactly and compared with the gradient of the
exact KL(pi || ref) = sum_x pi(x) (log pi(x) - log ref(x)).
"""

from __future__ import annotations

import torch

from metarl_llm.config import AlgoConfig
from metarl_llm.core.batch import RolloutBatch
from metarl_llm.models import Scores
from metarl_llm.rl.losses import kl_k2, kl_k3
from metarl_llm.rl.update import ppo_update


def _setup(seed: int, vocab: int = 6):
    gen = torch.Generator().manual_seed(seed)
    theta = (torch.randn(vocab, generator=gen, dtype=torch.float64) * 1.5).requires_grad_(True)
    ref_logp = torch.log_softmax(torch.randn(vocab, generator=gen, dtype=torch.float64) * 1.5, -1)
    return theta, ref_logp


def _exact_kl_grad(theta, ref_logp):
    logp = torch.log_softmax(theta, -1)
    kl = (logp.exp() * (logp - ref_logp)).sum()
    return torch.autograd.grad(kl, theta)[0]


def _expected_estimator_grad(estimator, theta, ref_logp):
    logp = torch.log_softmax(theta, -1)
    weights = logp.exp().detach()  # x ~ pi: the draw is not differentiated through
    return torch.autograd.grad((weights * estimator(logp, ref_logp)).sum(), theta)[0]


def test_k2_loss_has_the_gradient_of_kl_pi_ref():
    for seed in range(5):
        theta, ref_logp = _setup(seed)
        exact = _exact_kl_grad(theta, ref_logp)
        torch.testing.assert_close(_expected_estimator_grad(kl_k2, theta, ref_logp), exact, rtol=0, atol=1e-12)


def test_k3_gradient_is_that_of_the_reverse_kl():
    """Why k3 is only logged: its expected gradient is grad KL(ref || pi), measurably not grad KL(pi || ref)."""
    worst = 0.0
    for seed in range(5):
        theta, ref_logp = _setup(seed)
        k3_grad = _expected_estimator_grad(kl_k3, theta, ref_logp)
        logp = torch.log_softmax(theta, -1)
        reverse = (ref_logp.exp() * (ref_logp - logp)).sum()
        torch.testing.assert_close(k3_grad, torch.autograd.grad(reverse, theta)[0], rtol=0, atol=1e-12)
        worst = max(worst, float((k3_grad - _exact_kl_grad(theta, ref_logp)).abs().max()))
    assert worst > 0.05


class _Categorical(torch.nn.Module):
    """A policy over ``vocab`` tokens that ignores its context: every position has logits theta."""

    def __init__(self, theta: torch.Tensor):
        super().__init__()
        self.theta = torch.nn.Parameter(theta.detach().clone().float())

    def forward(self, input_ids, attention_mask, with_values=True, with_entropy=False, positions=None):
        logp = torch.log_softmax(self.theta, -1)
        lp = torch.zeros(input_ids.shape, dtype=torch.float32)
        lp[:, 1:] = logp[input_ids[:, 1:]]
        ent = -(logp.exp() * logp).sum().expand(input_ids.shape)
        return Scores(lp, torch.zeros(input_ids.shape), ent)


def test_ppo_update_kl_term_has_the_gradient_of_kl_pi_ref():
    """The update's loss with only the KL term (zero advantages, kl_coef 1). The batch holds
    each token x in proportion to pi(x) (pi chosen with small-integer counts, one action
    token per row), so the minibatch's token mean is exactly the expectation under pi, and
    one SGD step of lr 1 moves theta by minus the expected gradient of the KL term, which
    must equal minus the exact gradient of KL(pi || ref) (the old k3 loss missed it by 0.125)."""
    counts = torch.tensor([4, 2, 1, 1])  # pi = counts / 8
    theta0 = counts.double().log()
    ref_logp = torch.log_softmax(torch.tensor([0.3, -0.2, 1.0, 0.1], dtype=torch.float64), -1)
    tokens = torch.repeat_interleave(torch.arange(4), counts)  # [8] one action token per row
    b = tokens.shape[0]
    ids = torch.stack([torch.zeros(b, dtype=torch.long), tokens], 1)  # [8, 2]: a prompt token, then the action
    mask = torch.tensor([[0.0, 1.0]]).expand(b, 2).clone()
    logp0 = torch.log_softmax(theta0, -1).float()
    lp = torch.zeros(b, 2)
    lp[:, 1] = logp0[tokens]
    ref = torch.zeros(b, 2)
    ref[:, 1] = ref_logp.float()[tokens]
    zeros = torch.zeros(b, 2)
    batch = RolloutBatch(
        ids,
        torch.ones(b, 2, dtype=torch.long),
        mask,
        torch.zeros(b, 2, dtype=torch.long),
        lp,
        ref,
        zeros,
        zeros,
        zeros,
        zeros,
        torch.zeros(b),
        torch.zeros(b, dtype=torch.long),
    )
    model = _Categorical(theta0)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    cfg = AlgoConfig(ppo_epochs=1, minibatch_size=b, kl_coef=1.0, kl_in_reward=False, whiten_advantages=False, max_grad_norm=1e9)
    ppo_update(model, opt, batch, cfg, torch.Generator().manual_seed(0), use_critic=False)
    step = model.theta.detach().double() - theta0
    exact = _exact_kl_grad(theta0.clone().requires_grad_(True), ref_logp)
    torch.testing.assert_close(step, -exact, rtol=0, atol=1e-6)
