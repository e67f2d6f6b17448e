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
"""

from __future__ import annotations

import string
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from metarl_llm.config import ModelConfig, TinyModelConfig

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
CHARSET = "\n" + "".join(chr(c) for c in range(32, 127))  # newline + printable ASCII


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer: one token per printable ASCII character.

    Built with ``tokenizers`` (BPE without merges, so every character is a token;
    others map to ``<unk>``). No download.
    """
    from tokenizers import Tokenizer, decoders, models

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
    if cfg.hidden_size % cfg.num_heads:
        raise ValueError(f"model.tiny.hidden_size={cfg.hidden_size} is not divisible by num_heads={cfg.num_heads}")
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
    """The policy LM and its tokenizer: from ``path`` (a checkpoint), a hub id/dir, or the tiny config."""
    source = path or cfg.name_or_path
    if source is None:
        tok = build_char_tokenizer()
        model = build_tiny_model(cfg.tiny, len(tok), tok.pad_token_id, seed)
        return model, tok
    tok = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=resolve_dtype(cfg.dtype), trust_remote_code=cfg.trust_remote_code
    )
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model, tok


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


class ActorCritic(nn.Module):
    """A causal LM policy with a scalar value head (shared trunk or a separate critic)."""

    def __init__(self, policy: nn.Module, critic: str = "shared", critic_trunk: nn.Module | None = None):
        super().__init__()
        if critic not in ("shared", "separate"):
            raise ValueError(f"model.critic={critic!r}; expected 'shared' or 'separate'")
        self.policy = policy
        self.critic_mode = critic
        self.critic_trunk = critic_trunk if critic == "separate" else None
        if critic == "separate" and critic_trunk is None:
            raise ValueError("model.critic=separate needs a critic trunk")
        hidden = (critic_trunk.config if critic_trunk is not None else policy.config).hidden_size
        self.value_head = nn.Linear(hidden, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def policy_parameters(self) -> list[nn.Parameter]:
        """The LM's parameters (with a shared critic the value loss reaches them too)."""
        return list(self.policy.parameters())

    def critic_parameters(self) -> list[nn.Parameter]:
        """The value head, plus the critic trunk when it is separate."""
        trunk = list(self.critic_trunk.parameters()) if self.critic_trunk is not None else []
        return trunk + list(self.value_head.parameters())

    def score(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, with_values: bool = True, with_entropy: bool = False
    ) -> Scores:
        """Log-probs (and values, entropy) of every token of right-padded streams [B, T]."""
        out = self.policy(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=with_values and self.critic_mode == "shared",
            use_cache=False,
        )
        logits = out.logits[:, :-1]
        zeros = input_ids.new_zeros((input_ids.shape[0], 1), dtype=torch.float32)
        logprobs = torch.cat([zeros, token_logprobs(logits, input_ids[:, 1:])], 1)
        entropy = torch.cat([zeros, entropy_from_logits(logits)], 1) if with_entropy else None
        if not with_values:
            values = torch.zeros_like(logprobs)
        else:
            if self.critic_mode == "shared":
                hidden = out.hidden_states[-1]
            else:
                hidden = self.critic_trunk(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
            v = self.value_head(hidden[:, :-1].to(self.value_head.weight.dtype)).squeeze(-1).float()
            values = torch.cat([zeros, v], 1)
        return Scores(logprobs, values, entropy)


def build_actor_critic(policy: nn.Module, cfg: ModelConfig, seed: int) -> ActorCritic:
    """Wrap a policy LM with the configured critic."""
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
    return ActorCritic(policy, cfg.critic, trunk)
