"""Log-probs and entropy from hidden states at the scored positions only, in chunks
(models.causal_lm_scores, models._HeadLogprobs): equal to the full-logit computation, values and
gradients, in float64 on small shapes and in float32 within tolerance; the temperature applies;
heads that are not a plain linear layer take the model's own forward."""

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from metarl_llm.models import _HeadLogprobs, causal_lm_scores, set_temperature


def reference(hidden, weight, bias, targets, temperature):
    z = F.linear(hidden, weight, bias) / temperature
    logp = torch.log_softmax(z, -1)
    return logp.gather(-1, targets[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("bias", [False, True])
def test_the_chunked_head_equals_full_logits_in_float64(temperature, bias):
    g = torch.Generator().manual_seed(0)
    n, h, v = 11, 6, 37
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(v, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    a_lp, a_ent = reference(hidden, weight, b, targets, temperature)
    c_lp, c_ent = _HeadLogprobs.apply(hidden, weight, b, targets, temperature, 4, True)  # 3 chunks of rows
    assert c_lp.dtype == torch.float64 and torch.allclose(a_lp, c_lp, atol=1e-12) and torch.allclose(a_ent, c_ent, atol=1e-12)
    # gradients of a mix of both outputs, against autograd through the full logits (float64 inside)
    w1, w2 = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    inputs = [x for x in (hidden, weight, b) if x is not None]
    full = torch.autograd.grad((a_lp * w1).sum() + (a_ent * w2).sum(), inputs)
    ours = torch.autograd.grad((c_lp * w1).sum() + (c_ent * w2).sum(), inputs)
    for x, y in zip(full, ours):
        assert torch.allclose(x, y, atol=1e-12, rtol=1e-10)
    assert torch.autograd.gradcheck(
        lambda hh, ww: _HeadLogprobs.apply(hh, ww, None, targets, temperature, 5, True),
        (hidden, weight),
    )


def tiny_llama(vocab=53, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    return LlamaForCausalLM(cfg).eval()


def test_causal_lm_scores_equal_the_full_logits_of_a_model_at_the_positions_asked():
    model = tiny_llama()
    set_temperature(model, 0.8)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 53, (3, 9), generator=g)
    am = torch.ones_like(ids)
    am[1, 6:] = 0  # right padding
    positions = torch.rand(ids.shape, generator=g) < 0.6
    out = causal_lm_scores(model, ids, am, positions, with_entropy=True, with_hidden=True)
    logits = model(input_ids=ids, attention_mask=am).logits[:, :-1]  # the hook divides by 0.8
    logp = torch.log_softmax(logits.float(), -1)
    want = torch.zeros(3, 9, dtype=torch.bool)
    want[:, 1:] = positions[:, 1:] & am[:, 1:].bool()
    full_lp = torch.zeros(3, 9)
    full_lp[:, 1:] = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    full_ent = torch.zeros(3, 9)
    full_ent[:, 1:] = -(logp.exp() * logp).sum(-1)
    assert torch.allclose(out.logprobs, full_lp * want, atol=1e-5)
    assert torch.allclose(out.entropy, full_ent * want, atol=1e-5)
    assert (out.logprobs[~want] == 0).all() and out.hidden.shape == (3, 9, 16)
    # float32 gradients through the model against the full-logit loss
    model.zero_grad()
    (out.logprobs.sum() + 0.1 * out.entropy.sum()).backward()
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=am).logits[:, :-1]
    logp = torch.log_softmax(logits.float(), -1)
    loss = (logp.gather(-1, ids[:, 1:, None]).squeeze(-1) * want[:, 1:]).sum()
    loss = loss + 0.1 * (-(logp.exp() * logp).sum(-1) * want[:, 1:]).sum()
    loss.backward()
    for a, p in zip(ours, model.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-5, rtol=1e-4)


def test_trls_kernel_gives_the_same_log_probs_entropy_and_gradients():
    """The kernel of CUDA devices and of capped or scaled heads (trl.kernels, here its torch path)
    against ours, in float32."""
    from trl.kernels import ChunkedLogProbFunction

    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(40, 8, generator=g, requires_grad=True)
    weight = (torch.randn(301, 8, generator=g) * 0.5).requires_grad_()
    targets = torch.randint(0, 301, (40,), generator=g)
    ours = _HeadLogprobs.apply(hidden, weight, None, targets, 0.9, 7, True)
    theirs = ChunkedLogProbFunction.apply(hidden, weight, None, targets, 0.9, 64, None, 1.0, ("entropy",))[:2]
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=2e-5)
    ga = torch.autograd.grad(ours[0].sum() - 0.3 * ours[1].sum(), [hidden, weight])
    gb = torch.autograd.grad(theirs[0].sum() - 0.3 * theirs[1].sum(), [hidden, weight])
    for a, b in zip(ga, gb):
        assert torch.allclose(a, b, atol=2e-5)


def test_a_scaled_head_is_scored_as_the_model_scores_it():
    model = tiny_llama()
    model.config.logit_scale = 0.5  # a Cohere-style scale: trl's kernel applies it (transformers' Llama does not)
    ids = torch.randint(0, 53, (2, 7), generator=torch.Generator().manual_seed(2))
    out = causal_lm_scores(model, ids, torch.ones_like(ids))
    logp = torch.log_softmax(0.5 * model(input_ids=ids).logits[:, :-1].float(), -1)
    assert torch.allclose(out.logprobs[:, 1:], logp.gather(-1, ids[:, 1:, None]).squeeze(-1), atol=1e-5)


def test_a_head_that_is_not_plain_linear_takes_the_models_forward():
    model = tiny_llama()
    model.lm_head = torch.nn.Sequential(model.lm_head)  # not an nn.Linear: the model's own logits are used
    ids = torch.randint(0, 53, (2, 7), generator=torch.Generator().manual_seed(2))
    out = causal_lm_scores(model, ids, torch.ones_like(ids))
    logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1)
    assert torch.allclose(out.logprobs[:, 1:], logp.gather(-1, ids[:, 1:, None]).squeeze(-1), atol=1e-5)
