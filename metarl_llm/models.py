"""Policy and critic models.

- ``model.name_or_path=None`` builds the tiny default: a Llama-style model of about
  1M parameters from a config, with a character-level tokenizer built locally
  (``tokenizers``); both are saved beside every checkpoint.
- Any other value is a hub id or a local directory loaded with transformers.

:class:`ActorCritic` adds a scalar value head. With ``critic=shared`` the head reads
the policy trunk's last hidden state (cheap, the default for tiny models); with
``critic=separate`` a second trunk carries the head.

Alignment convention (used by every tensor of a rollout batch, [B, T]): position
``t`` holds quantities of the *action* that produced token ``t``: ``logprobs[:, t] =
log pi(x_t | x_<t)`` and ``values[:, t] = V(x_<t)``; position 0 has no action and
holds 0.

LoRA policies (``model.lora.r > 0``, :func:`add_lora`): peft injects LoRA layers into
the policy *in place*, so the policy stays the transformers model every other module
uses (rollout, bonus, evaluation); the ``PeftModel`` that manages the adapter is kept
beside it (:attr:`ActorCritic.adapter`). The frozen reference is then
:class:`AdapterDisabled`: the same weights run with the adapter switched off, no second
copy of the model (:func:`frozen_reference`). Checkpoints hold the merged weights, so
:func:`load_policy` reads them like any other (:func:`save_policy`).

Precision (``model.autocast``, :func:`autocast_dtype`): the forward passes of the training
rollout, of scoring and of the PPO update may run under ``torch.autocast`` (bf16); log-probs, entropies,
values and losses are computed in float32 from its outputs.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import string
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from metarl_llm.config import Autocast, ModelConfig, PolicyLoraConfig, TinyModelConfig

if TYPE_CHECKING:
    from peft import PeftModel

log = logging.getLogger(__name__)


SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
CHARSET = "\n" + "".join(chr(c) for c in range(32, 127))  # newline + printable ASCII


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer: one token per printable ASCII character.

    Built with ``tokenizers`` (BPE without merges, so every character is a token;
    others map to ``<unk>``). No download.
    """

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS.values())}
    for ch in CHARSET:
        vocab[ch] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=SPECIAL_TOKENS["unk_token"], fuse_unk=False))
    core.decoder = decoders.Fuse()
    core.add_special_tokens(list(SPECIAL_TOKENS.values()))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, **SPECIAL_TOKENS)
    assert string.digits in tok.decode(tok.encode(string.digits, add_special_tokens=False))
    return tok


def build_tiny_model(cfg: TinyModelConfig, vocab_size: int, pad_token_id: int, seed: int) -> LlamaForCausalLM:
    """A Llama-style causal LM from a config (~1M parameters with the defaults)."""
    cfg.validate()
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        pad_token_id=pad_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"model.dtype={name!r} is not one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def load_policy(cfg: ModelConfig, seed: int, path: str | None = None) -> tuple[nn.Module, PreTrainedTokenizerFast]:
    """The policy LM and its tokenizer: from ``path`` (a checkpoint), a hub id/dir, or the tiny config.

    A checkpoint's ``policy/`` holds plain (for LoRA runs: merged) weights, so it loads
    here whatever ``model.lora`` says. ``model.gradient_checkpointing`` is applied to every
    source (:func:`enable_gradient_checkpointing`).
    """
    source = path or cfg.name_or_path
    if source is None:
        tok = build_char_tokenizer()
        model = build_tiny_model(cfg.tiny, len(tok), tok.pad_token_id, seed)
    else:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=resolve_dtype(cfg.dtype), trust_remote_code=cfg.trust_remote_code
        )
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model, tok


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer's activations in the backward pass (training mode only).

    Non-reentrant checkpointing, so that gradients reach LoRA parameters even though the
    frozen embeddings' outputs do not require grad. The model must then be called with
    ``use_cache=False`` in training (:meth:`ActorCritic.score` does); generation in eval
    mode is unaffected.
    """
    model.activation_checkpointing_enable({"use_reentrant": False})


# ------------------------------------------------------------------ tempered policy

_TEMPERATURE = "_metarl_temperature"  # attribute of the output-embedding module holding T


def _head(model: nn.Module) -> nn.Module:
    """The output-embedding module of ``model`` (through a LoRA reference's AdapterDisabled wrapper)."""
    head = model.get_output_embeddings()
    return head.module if isinstance(head, AdapterDisabled) else head


def _temper_logits(head: nn.Module, _args, logits: torch.Tensor) -> torch.Tensor:
    return logits / getattr(head, _TEMPERATURE)


def set_temperature(model: nn.Module, temperature: float) -> None:
    """Make ``model`` the tempered policy softmax(logits / ``temperature``): its LM head's output is
    divided by ``temperature`` (a forward hook on the output embeddings), so every distribution
    taken from it is the tempered one: the rollout's draws and their log-probs, the scoring and
    update passes, the reference (a copy, or the same weights with the adapter disabled), the
    meta-prover and the likelihood estimator. 1.0 removes the hook (the raw logits). Every
    computation of the policy's logits must go through the output-embedding module.

    Saved weights are unchanged (a hook is not state); a model loaded back has temperature 1
    until this is called again."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature} (greedy decoding is its own option)")
    head = _head(model)
    handle = getattr(head, "_metarl_temperature_hook", None)
    if handle is not None:
        handle.remove()
        head._metarl_temperature_hook = None
    setattr(head, _TEMPERATURE, float(temperature))
    if temperature != 1.0:
        head._metarl_temperature_hook = head.register_forward_hook(_temper_logits)


def temperature_of(model: nn.Module) -> float:
    """The temperature :func:`set_temperature` gave ``model`` (1.0 if none)."""
    return float(getattr(_head(model), _TEMPERATURE, 1.0))


@contextlib.contextmanager
def tempered(model: nn.Module, temperature: float):
    """``model`` at ``temperature`` inside the block (held-out evaluation at its own temperature),
    its own temperature restored after."""
    before = temperature_of(model)
    set_temperature(model, temperature)
    try:
        yield model
    finally:
        set_temperature(model, before)


# ------------------------------------------------------------------ precision

AUTOCAST_MODES = tuple(m.value for m in Autocast)  # ("auto", "bf16", "off")


def autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``model.autocast`` on ``device``: None (no autocast) or bfloat16.

    ``auto``: bf16 on CUDA devices that support it, off elsewhere (on CPU bf16 is slower
    than float32 for small models). ``bf16``: on any device (a CUDA device without bf16
    is an error). ``off``: never.
    """
    if setting not in AUTOCAST_MODES:
        raise ValueError(f"model.autocast={setting!r}; expected one of {AUTOCAST_MODES}")
    device = torch.device(device)
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if setting == "off" or (setting == "auto" and not cuda_bf16):
        return None
    if device.type == "cuda" and not cuda_bf16:
        raise ValueError(f"model.autocast=bf16: the CUDA device {device} does not support bfloat16")
    return torch.bfloat16


def set_cudnn_attention(allowed: bool) -> None:
    """Allow or forbid PyTorch's cuDNN backend of ``scaled_dot_product_attention``
    (process-wide; no effect without CUDA). Measured on an H100 with torch 2.11: it builds
    an execution plan for every new (batch, query, key) shape, about 40 ms each, and a
    rollout meets a new key length at every decoding step; without it (flash, efficient
    or math kernels) the cached engine played 64 four-episode trials of a 113M model in
    3.8 s instead of 7.2 s, and the meta-prover ran in 4.5 s instead of 19.1 s
    (bench/results/README.md). ``model.cudnn_attention`` (default false) sets it."""
    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(allowed)


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast(device.type, dtype)``, or a no-op when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


class Scores(NamedTuple):
    """Per-token outputs of :meth:`ActorCritic.score`, each [B, T] (position 0 is 0).

    logprobs: log pi(x_t | x_<t) of the token actually in the stream.
    values:   V(x_<t), the critic's estimate before token t (zeros if no critic).
    entropy:  entropy of pi(. | x_<t) (only when asked for, else None).
    """

    logprobs: torch.Tensor
    values: torch.Tensor
    entropy: torch.Tensor | None


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """log softmax(logits)[targets] in float32 without materialising the full log-softmax.

    logits [N, L, V], targets [N, L] -> [N, L]. Rows are processed in chunks so that a
    large vocabulary does not need an [N, L, V] float32 copy at once.
    """
    flat = logits.reshape(-1, logits.shape[-1])
    tgt = targets.reshape(-1)
    out = torch.empty(tgt.shape, dtype=torch.float32, device=logits.device)
    for s in range(0, flat.shape[0], chunk):
        lg = flat[s : s + chunk].float()
        out[s : s + chunk] = lg.gather(-1, tgt[s : s + chunk, None]).squeeze(-1) - torch.logsumexp(lg, -1)
    return out.view(targets.shape)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last axis, float32."""
    lg = logits.float()
    logp = F.log_softmax(lg, -1)
    return -(logp.exp() * logp).sum(-1)


# ------------------------------------------------------------------ log-probs from hidden states

HEAD_CHUNK_ELEMENTS = (
    1 << 22
)  # logits per chunk of the LM head (4M floats, 16 MB in float32; rows = this // V): measured fastest here, 1.4x faster than 16M at V = 152k


class _HeadLogprobs(torch.autograd.Function):
    """log softmax(h W^T + b)[target] and its entropy for N rows of hidden states, in chunks of
    rows, with a backward that recomputes each chunk's logits: neither pass keeps an [N, V] tensor
    (one chunk's logits and one more of its size are the workspace; the rest is in place).

    hidden [N, H], weight [V, H], bias [V] or None, targets [N] long -> (logprobs [N], entropy [N]),
    float32 (float64 for float64 inputs); logits are computed in ``hidden``'s dtype and reduced in
    float32 (or float64), divided by ``temperature`` first."""

    @staticmethod
    def _log_softmax(h, w, b, temperature, acc):
        """A chunk's log-probs [n, V] (in place of its logits) and logsumexp [n, 1]."""
        z = F.linear(h, w, b).to(acc)
        if temperature != 1.0:
            z /= temperature
        lse = torch.logsumexp(z, -1, keepdim=True)
        return z.sub_(lse), lse

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature: float, rows: int, with_entropy: bool):
        ctx.set_materialize_grads(False)
        n = hidden.shape[0]
        acc = torch.promote_types(hidden.dtype, torch.float32)  # the reductions' dtype
        lp = torch.empty(n, dtype=acc, device=hidden.device)
        ent = torch.empty(n, dtype=acc, device=hidden.device) if with_entropy else None
        w = weight.to(hidden.dtype)
        b = bias.to(hidden.dtype) if bias is not None else None
        for s in range(0, n, rows):
            logp, _ = _HeadLogprobs._log_softmax(hidden[s : s + rows], w, b, temperature, acc)
            lp[s : s + rows] = logp.gather(-1, targets[s : s + rows, None]).squeeze(-1)
            if ent is not None:  # H = -sum_j p_j log p_j
                ent[s : s + rows] = -(logp.exp().mul_(logp)).sum(-1)
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.temperature, ctx.rows = temperature, rows
        return lp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        hidden, weight, bias, targets = ctx.saved_tensors
        t, rows = ctx.temperature, ctx.rows
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        acc = torch.promote_types(hidden.dtype, torch.float32)
        g_hidden = torch.zeros_like(hidden) if need_h else None
        g_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        g_bias = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b and bias is not None else None
        w = weight.to(hidden.dtype)
        b = bias.to(hidden.dtype) if bias is not None else None
        for s in range(0, hidden.shape[0], rows):
            h = hidden[s : s + rows]
            logp, _ = _HeadLogprobs._log_softmax(h, w, b, t, acc)
            p = logp.exp()
            n = h.shape[0]
            g_l = g_lp[s : s + rows, None].to(acc) if g_lp is not None else torch.zeros((n, 1), dtype=acc, device=h.device)
            # d lp_i / d z_j = [j = target_i] - p_j ;  d H_i / d z_j = -p_j (log p_j + H_i), so
            # dz = p * (-g_lp - g_ent (log p + H)) + g_lp at the target
            if g_ent is not None:
                g_e = g_ent[s : s + rows, None].to(acc)
                entropy = -(p * logp).sum(-1, keepdim=True)
                dz = logp.add_(entropy).mul_(-g_e).sub_(g_l).mul_(p)
            else:
                dz = p.mul_(-g_l)
            dz.scatter_add_(-1, targets[s : s + rows, None], g_l)
            if t != 1.0:
                dz /= t
            dz = dz.to(hidden.dtype)
            if g_hidden is not None:
                g_hidden[s : s + rows] = dz @ w
            if g_weight is not None:
                g_weight += (dz.t() @ h).to(acc)
            if g_bias is not None:
                g_bias += dz.sum(0).to(acc)
        return (
            g_hidden,
            g_weight.to(weight.dtype) if g_weight is not None else None,
            g_bias.to(bias.dtype) if g_bias is not None else None,
            None,
            None,
            None,
            None,
        )


def _chunkable_head(model: nn.Module) -> tuple[nn.Linear, float | None, float] | None:
    """(``model``'s LM head, its final logit soft-cap, its logit scale) when the logits are
    ``F.linear`` of the trunk's last hidden state, then capped and scaled (a plain ``nn.Linear``
    head): :func:`causal_lm_scores` then applies it itself, in chunks. None otherwise (a LoRA on
    the head, a model without a ``base_model`` trunk): the model's own forward is used."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear or getattr(model, "base_model", model) is model:
        return None
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    scale = getattr(config, "logit_scale", None)
    return head, getattr(config, "final_logit_softcapping", None), 1.0 if scale is None else float(scale)


def head_logprobs(
    hidden: torch.Tensor,
    head: nn.Linear,
    targets: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    softcap: float | None = None,
    logit_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(head(hidden) / T)[targets] and the entropy, [N] each, for hidden [N, H], without
    an [N, V] tensor in the forward or the backward.

    The kernel: on CUDA, and for soft-capped or scaled logits, trl's maintained
    ``trl.kernels.ChunkedLogProbFunction`` (Triton on GPUs: tiles of tokens and of the vocabulary
    with an online logsumexp; torch ops elsewhere). Otherwise :class:`_HeadLogprobs`, chunks of
    ``HEAD_CHUNK_ELEMENTS // V`` rows in torch ops: measured 1.6x faster than trl's torch path on
    this 2-core CPU at V = 152k (2,000 rows of width 64, forward and backward with entropy: 5.9 s
    against 9.2 s, medians of 3), and exact in float64 (trl's returns float32). tests/test_chunked_logprobs.py checks both
    against the full logits."""
    if hidden.device.type == "cuda" or softcap is not None or logit_scale != 1.0:
        from trl.kernels import ChunkedLogProbFunction  # deferred: start-up cost (trl loads only where its kernel runs)

        out = ChunkedLogProbFunction.apply(
            hidden, head.weight, head.bias, targets, temperature, 4096, softcap, logit_scale,
            ("entropy",) if with_entropy else (),
        )  # fmt: skip
        return out[0], out[1]
    rows = max(1, HEAD_CHUNK_ELEMENTS // head.weight.shape[0])
    return _HeadLogprobs.apply(hidden, head.weight, head.bias, targets, temperature, rows, with_entropy)


class LMScores(NamedTuple):
    """Output of :func:`causal_lm_scores`, each [B, T] float32 (0 where not asked for; position 0 is 0).

    logprobs: log pi(x_t | x_<t) of the token in the stream.
    entropy:  entropy of pi(. | x_<t), or None.
    hidden:   [B, T, H] the last-layer hidden states (the LM head's input), or None.
    """

    logprobs: torch.Tensor
    entropy: torch.Tensor | None
    hidden: torch.Tensor | None


def causal_lm_scores(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: torch.Tensor | None = None,
    with_entropy: bool = False,
    with_hidden: bool = False,
) -> LMScores:
    """Log-probs (and entropy) of the tokens of right-padded streams under a causal LM, at the
    positions asked for only, without a [B, T, V] tensor.

    input_ids, attention_mask [B, T]; ``positions`` [B, T] bool: the tokens whose log-prob is
    needed (default: every real token after the first). The trunk runs once; its last hidden
    states at the positions before those tokens ([N, H]) go through the LM head and the
    log-softmax in chunks of ``HEAD_CHUNK_ELEMENTS // V`` rows, forward and backward
    (:func:`head_logprobs`, which recomputes each chunk's logits in the backward), so memory
    holds one chunk of logits, not B x T x V. The model's temperature
    (:func:`set_temperature`) is applied. Models whose head is not a plain linear layer
    (a LoRA on the head) take their own forward and gather from its logits. ``with_hidden``: also return the last hidden states (a shared critic's input).
    Soft-capped or scaled heads (Gemma, Cohere) go through trl's kernel (:func:`head_logprobs`).
    A LoRA reference (:class:`AdapterDisabled`) runs with its adapter disabled."""
    if isinstance(model, AdapterDisabled):
        with model.adapter.disable_adapter():
            return causal_lm_scores(model.module, input_ids, attention_mask, positions, with_entropy, with_hidden)
    if callable(getattr(model, "get_base_model", None)):  # a PeftModel: the causal LM it wraps, adapter active
        model = model.get_base_model()
    b, t = input_ids.shape
    want = (attention_mask if positions is None else positions)[:, 1:].bool() & attention_mask[:, 1:].bool()
    idx = want.nonzero(as_tuple=True)  # token t + 1 of row r is scored from the hidden state at t
    targets = input_ids[:, 1:][idx]
    plain = _chunkable_head(model)
    zeros = torch.zeros((b, 1), dtype=torch.float32, device=input_ids.device)
    hidden = None
    if plain is not None:
        head, softcap, scale = plain
        out = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden = out.last_hidden_state
        lp_n, ent_n = head_logprobs(
            hidden[:, :-1][idx].to(head.weight.device), head, targets, temperature_of(model), with_entropy, softcap, scale
        )
    else:  # the model's own head: full logits, reduced in chunks of rows
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=with_hidden, use_cache=False)
        hidden = out.hidden_states[-1] if with_hidden else None
        logits = out.logits[:, :-1][idx]
        lp_n = token_logprobs(logits[None], targets[None])[0]
        ent_n = entropy_from_logits(logits) if with_entropy else None

    def place(v: torch.Tensor) -> torch.Tensor:
        full = torch.zeros((b, t - 1), dtype=torch.float32, device=input_ids.device).index_put(idx, v.float())
        return torch.cat([zeros, full], 1)

    return LMScores(place(lp_n), place(ent_n) if with_entropy else None, hidden if with_hidden else None)


def head_values(value_head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The value head on last-layer hidden states: [..., H] -> [...] float32, in float32 with
    autocast disabled ([..., H] @ [H, 1]: cheap). One function for :meth:`ActorCritic.score`
    and the rollout engines (values computed while sampling), so that both compute alike."""
    with torch.autocast(hidden.device.type, enabled=False):
        return value_head(hidden.to(value_head.weight.dtype)).squeeze(-1).float()


class ActorCritic(nn.Module):
    """A causal LM policy with a scalar value head (shared trunk or a separate critic).

    ``adapter``: the ``PeftModel`` whose LoRA layers were injected into ``policy``
    (:func:`add_lora`), or None for full fine-tuning. It contains ``policy`` itself, so
    it is kept out of the module tree (no duplicate parameters or state_dict keys).
    """

    def __init__(
        self,
        policy: nn.Module,
        critic: str = "shared",
        critic_trunk: nn.Module | None = None,
        adapter: "PeftModel | None" = None,
    ):
        super().__init__()
        if critic not in ("shared", "separate"):
            raise ValueError(f"model.critic={critic!r}; expected 'shared' or 'separate'")
        if adapter is not None and adapter.get_base_model() is not policy:
            raise ValueError("ActorCritic: the adapter does not hold this policy (wrap the policy with add_lora)")
        self.policy = policy
        self.__dict__["adapter"] = adapter  # plain attribute: not a submodule (see the class docstring)
        self.critic_mode = critic
        self.critic_trunk = critic_trunk if critic == "separate" else None
        if critic == "separate" and critic_trunk is None:
            raise ValueError("model.critic=separate needs a critic trunk")
        hidden = (critic_trunk.config if critic_trunk is not None else policy.config).hidden_size
        self.value_head = nn.Linear(hidden, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def policy_parameters(self) -> list[nn.Parameter]:
        """The LM's trainable parameters: all of them, or with LoRA the adapter's only (the
        base weights are frozen). With a shared critic the value loss reaches them too."""
        return [p for p in self.policy.parameters() if p.requires_grad]

    def critic_parameters(self) -> list[nn.Parameter]:
        """The value head, plus the critic trunk when it is separate."""
        trunk = list(self.critic_trunk.parameters()) if self.critic_trunk is not None else []
        return trunk + list(self.value_head.parameters())

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        with_values: bool = True,
        with_entropy: bool = False,
        positions: torch.Tensor | None = None,
    ) -> Scores:
        """:meth:`score`, as ``forward`` so that a data-parallel wrapper (DDP, FSDP) sees the call."""
        return self.score(input_ids, attention_mask, with_values=with_values, with_entropy=with_entropy, positions=positions)

    def score(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        with_values: bool = True,
        with_entropy: bool = False,
        positions: torch.Tensor | None = None,
    ) -> Scores:
        """Log-probs (and values, entropy) of the tokens of right-padded streams [B, T].

        input_ids, attention_mask [B, T] -> :class:`Scores` of [B, T] float32 tensors. ``positions``
        [B, T] bool: the tokens scored (the action tokens; default every real token after the
        first); everything is 0 elsewhere. The LM head runs at those positions only, in chunks
        (:func:`causal_lm_scores`): no [B, T, V] logits. Runs under the caller's autocast, if any;
        the value head runs in float32 outside it.
        """
        shared = with_values and self.critic_mode == "shared"
        out = causal_lm_scores(self.policy, input_ids, attention_mask, positions, with_entropy, with_hidden=shared)
        zeros = torch.zeros((input_ids.shape[0], 1), dtype=torch.float32, device=input_ids.device)
        if not with_values:
            values = torch.zeros_like(out.logprobs)
        else:
            if shared:
                hidden = out.hidden
            else:
                hidden = self.critic_trunk(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
            values = torch.cat([zeros, head_values(self.value_head, hidden[:, :-1])], 1)
            if positions is not None:
                values = values * positions.to(values.dtype)
        return Scores(out.logprobs, values, out.entropy)


def disable_dropout(module: nn.Module) -> list[str]:
    """Switch off every dropout of ``module`` in place; returns what was non-zero ("name.attr=p").

    PPO's ratio pi / pi_old is 1 at the first step only if the update's forward pass
    computes the same function as the sampling and scoring passes, which run in eval mode.
    The update must run in train mode (gradient checkpointing acts only there), so the
    dropouts themselves are set to 0: ``nn.Dropout`` modules, and the float dropout rates
    that attention implementations read from their module or the model config
    (``attention_dropout``, ``*_pdrop``, ...)."""
    changed = []
    configs = {}
    for name, m in module.named_modules():
        if isinstance(m, nn.Dropout):
            if m.p > 0:
                changed.append(f"{name}.p={m.p}")
                m.p = 0.0
            continue
        for attr in ("attention_dropout", "dropout", "attn_dropout"):
            v = getattr(m, attr, None)
            if isinstance(v, float) and v > 0:
                changed.append(f"{name}.{attr}={v}")
                setattr(m, attr, 0.0)
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "to_dict"):
            configs[id(cfg)] = cfg
    for cfg in configs.values():
        for key, v in cfg.to_dict().items():
            if ("dropout" in key or key.endswith("pdrop")) and isinstance(v, float) and v > 0:
                changed.append(f"config.{key}={v}")
                setattr(cfg, key, 0.0)
    return changed


def build_actor_critic(policy: nn.Module, cfg: ModelConfig, seed: int) -> ActorCritic:
    """Wrap a policy LM with the configured critic; with ``cfg.lora.r > 0`` first give it a
    fresh LoRA adapter (:func:`add_lora`, seeded ``cfg.lora.seed`` or ``seed``), which
    freezes the policy's own weights. Every dropout of policy and critic is switched off
    (:func:`disable_dropout`): sampling, scoring and the update then compute one function."""
    adapter = None
    if cfg.lora.r > 0:
        adapter = add_lora(policy, cfg.lora, seed if cfg.lora.seed is None else cfg.lora.seed)
    trunk = None
    if cfg.critic == "separate":
        src = cfg.critic_name_or_path or cfg.name_or_path
        if src is None:
            # Tiny separate critic: a fresh trunk of the policy's architecture.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + 1)
                trunk = type(policy)(policy.config).model
        else:
            trunk = AutoModel.from_pretrained(src, dtype=resolve_dtype(cfg.dtype), trust_remote_code=cfg.trust_remote_code)
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(trunk)
    actor_critic = ActorCritic(policy, cfg.critic, trunk, adapter)
    changed = disable_dropout(actor_critic)
    if changed:
        log.warning(
            "PPO runs without dropout (the ratio's passes must compute one function); set to 0: %s",
            ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else ""),
        )
    return actor_critic


# ------------------------------------------------------------------ LoRA policies


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run with torch's RNG seeded (CPU, and ``device`` if CUDA), restoring it afterwards."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def add_lora(policy: nn.Module, cfg: PolicyLoraConfig, seed: int) -> "PeftModel":
    """Give ``policy`` a fresh LoRA adapter (peft) and freeze its own weights; returns the ``PeftModel``.

    The LoRA layers are injected *in place*: ``policy`` itself now computes
    ``W x + (alpha / r) * B A x`` on every ``cfg.target_modules`` projection and is still
    the transformers model that rollouts, bonuses and evaluation call. A is initialised
    from ``seed`` (deterministic), B is zero, so the wrapped policy starts with exactly
    the base model's outputs. Only the ``lora_`` parameters require grad afterwards.
    The returned ``PeftModel`` manages the adapter (disable, save, merge).
    """
    cfg.validate()
    if cfg.r < 1:
        raise ValueError(f"add_lora: model.lora.r must be >= 1 to add an adapter, got {cfg.r}")
    return inject_lora(policy, cfg.r, cfg.alpha, cfg.dropout, cfg.target_modules, seed, option="model.lora")


def inject_lora(model: nn.Module, r: int, alpha: float, dropout: float, target_modules, seed: int, option: str) -> "PeftModel":
    """The one LoRA injection (the PPO policy's ``model.lora`` and test-time training's ``ttt``):
    peft LoRA layers of rank ``r`` and scale ``alpha / r`` on the ``target_modules`` projections of
    ``model``, *in place*, its own weights frozen; A drawn from ``seed``, B zero, so the model starts
    with exactly its base outputs. Returns the ``PeftModel`` (disable, save, merge, reset).
    ``option`` names the config group in errors. Only ``lora_`` parameters require grad afterwards."""
    from peft import LoraConfig, get_peft_model  # deferred: start-up cost (peft loads only when LoRA is on)

    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [m for m in target_modules if m not in names]
    if missing:
        raise ValueError(f"{option}.target_modules: {missing} not found in the model (it has e.g. {sorted(names)[:12]})")
    lora = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules), bias="none", task_type="CAUSAL_LM"
    )
    with seeded(seed, next(model.parameters()).device), warnings.catch_warnings():
        # peft reads transformers' deprecated `is_gradient_checkpointing`: noise on every run.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        adapter = get_peft_model(model, lora)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if not trainable or not all("lora_" in n for n in trainable):
        raise RuntimeError(f"{option}: unexpected trainable parameters after adding LoRA: {trainable[:6]}")
    return adapter


class AdapterDisabled(nn.Module):
    """The base model inside a LoRA policy: ``module`` run with the adapter disabled.

    The frozen reference of a LoRA run (:func:`frozen_reference`): every call enters
    peft's ``disable_adapter()``, so it computes exactly what the base model computed
    before the adapter was added, from the very same parameter tensors (no copy), however
    the adapter has been trained since. It offers what this codebase calls on a causal LM:
    ``forward``, ``generate``, ``config``, ``base_model`` (the trunk, also adapter-free)
    and ``get_output_embeddings``.

    It shares its parameters with the policy: moving it moves the policy, and it runs in
    the policy's train/eval mode (the trainer scores in eval mode). Do not call
    ``requires_grad_`` on it: that would freeze the adapter too.
    """

    def __init__(self, adapter: "PeftModel", module: nn.Module | None = None):
        super().__init__()
        self.module = adapter.get_base_model() if module is None else module
        self.__dict__["adapter"] = adapter  # contains ``module``: a plain attribute, not a submodule

    def forward(self, *args, **kwargs):
        with self.adapter.disable_adapter():
            return self.module(*args, **kwargs)

    def generate(self, *args, **kwargs):
        with self.adapter.disable_adapter():
            return self.module.generate(*args, **kwargs)

    @property
    def config(self):
        return self.module.config

    @property
    def base_model(self) -> "AdapterDisabled":
        return AdapterDisabled(self.adapter, self.module.base_model)

    def get_output_embeddings(self) -> "AdapterDisabled":
        return AdapterDisabled(self.adapter, self.module.get_output_embeddings())


def frozen_reference(actor_critic: ActorCritic) -> nn.Module:
    """The frozen reference model of the KL term and of ``bonus.use_reference``, taken at the
    start of training: with LoRA the policy's own weights with the adapter disabled
    (:class:`AdapterDisabled`, no second copy); else a frozen deep copy of the policy."""
    if actor_critic.adapter is not None:
        return AdapterDisabled(actor_critic.adapter)
    return copy.deepcopy(actor_critic.policy).eval().requires_grad_(False)


def merged_policy(actor_critic: ActorCritic) -> nn.Module:
    """The policy as a plain transformers model: ``actor_critic.policy`` itself for full
    fine-tuning; with LoRA a merged copy (W + (alpha / r) B A), the live policy untouched."""
    if actor_critic.adapter is None:
        return actor_critic.policy
    return copy.deepcopy(actor_critic.adapter).merge_and_unload()


def save_policy(actor_critic: ActorCritic, directory: str | Path) -> None:
    """Write ``directory/policy`` (plain weights, merged for LoRA: loadable by
    :func:`load_policy`) and, for LoRA, ``directory/adapter`` (the adapter alone, for
    ``peft.PeftModel.from_pretrained(base_model, directory/adapter)``)."""
    directory = Path(directory)
    merged_policy(actor_critic).save_pretrained(directory / "policy")
    if actor_critic.adapter is not None:
        actor_critic.adapter.save_pretrained(directory / "adapter")
