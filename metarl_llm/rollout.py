"""Multi-episode rollouts: trials as token streams.

The MDP the trainer optimises (DESIGN.md section 5)
---------------------------------------------------
The state is every token so far; an **action is one policy token**. Tokens that the
environment inserts (feedback observations, the forced-answer text) and the prompt
are part of the transition, not actions: ``action_mask`` is 0 on them and no loss,
advantage or reward is ever placed there. Episode ends are *not* terminal (return
flows across episodes, the point of RL^2); only the trial end is.

Token in, token out: the stream is the concatenation of the tokenised prompt, the
sampled tokens (kept as sampled, never decoded and re-encoded) and the tokenised
observations. Text is decoded only to hand an episode to the environment.

Sampling is plain ancestral sampling from softmax(logits) (temperature 1, no top-k,
no top-p), so the sampling distribution is the policy the trainer scores.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F

from metarl_llm.config import BudgetConfig


class Sampled(NamedTuple):
    """Output of :func:`sample`; N rows.

    tokens   [N, L] sampled ids, ``pad_id`` after each row's end.
    logprobs [N, L] log pi of each sampled token under the sampling forward pass (0 after the end).
    lengths  [N]    tokens per row, the stop token included.
    stopped  [N]    True if the row ended on a stop id (False: cut by its length limit).
    values   [N, L] the critic's value of each sampled token from the sampling forward's last
                    hidden state (0 after the end); None unless the engine was given a value head.
    """

    tokens: torch.Tensor
    logprobs: torch.Tensor
    lengths: torch.Tensor
    stopped: torch.Tensor
    values: torch.Tensor | None = None


def multinomial(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row of ``probs`` [N, V] (unnormalised is fine) -> [N] long.

    ``generator`` may live on another device than ``probs`` (the trainer's CPU generator
    with a CUDA policy): the N uniforms are then drawn from it and inverted through the
    rows' CDF on ``probs``' device; on one device this is ``torch.multinomial``."""
    if generator is None or generator.device.type == probs.device.type:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    u = torch.rand(probs.shape[0], generator=generator, device=generator.device).to(probs.device)
    cdf = probs.cumsum(-1)
    # right=True: the first token whose CDF exceeds u * total, so a zero-probability token is never drawn (even at u = 0).
    return torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    contexts: list[list[int]],
    max_new_tokens: int | list[int],
    stop_ids: torch.Tensor,
    pad_id: int,
    generator: torch.Generator | None = None,
    max_rows: int = 512,
    greedy: bool = False,
) -> Sampled:
    """Sample continuations of token contexts with a KV cache, batched (``greedy``: the
    argmax token instead, first index on ties; log-probs are still reported).

    Rows stop independently at any id in ``stop_ids`` (episode delimiter, EOS) or at
    their own ``max_new_tokens``; the batch runs until every row has stopped. Contexts
    are left-padded internally; ``max_rows`` bounds the rows per forward pass.
    """
    n = len(contexts)
    limits = torch.as_tensor(max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * n)
    if n == 0:
        empty = torch.zeros((0, 0), dtype=torch.long)
        return Sampled(empty, empty.float(), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.bool))
    if any(len(c) == 0 for c in contexts):
        raise ValueError("sample: every context needs at least one token")
    if n > max_rows:
        parts = [
            sample(model, contexts[s : s + max_rows], limits[s : s + max_rows].tolist(), stop_ids, pad_id, generator, max_rows, greedy)
            for s in range(0, n, max_rows)
        ]
        width = max(p.tokens.shape[1] for p in parts)
        pad = lambda t, v: F.pad(t, (0, width - t.shape[1]), value=v)  # noqa: E731
        return Sampled(
            torch.cat([pad(p.tokens, pad_id) for p in parts]),
            torch.cat([pad(p.logprobs, 0.0) for p in parts]),
            torch.cat([p.lengths for p in parts]),
            torch.cat([p.stopped for p in parts]),
        )
    device = next(model.parameters()).device
    limits = limits.to(device)
    stop_ids = stop_ids.to(device)
    width = max(len(c) for c in contexts)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, c in enumerate(contexts):
        ids[i, width - len(c) :] = torch.as_tensor(c)
        mask[i, width - len(c) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    max_len = int(limits.max())
    from metarl_llm.engine import growing_cache  # (engine imports this module) a cache appended in place, not concatenated

    out = model(input_ids=ids, attention_mask=mask, position_ids=position, past_key_values=growing_cache(model, width + max_len),
                use_cache=True)
    cache, logits = out.past_key_values, out.logits[:, -1]
    next_pos = position[:, -1:] + 1
    tokens = torch.full((n, max_len), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((n, max_len), dtype=torch.float32, device=device)
    done = limits <= 0
    lengths = torch.zeros(n, dtype=torch.long, device=device)
    stopped = torch.zeros(n, dtype=torch.bool, device=device)
    for t in range(max_len):
        logp = F.log_softmax(logits.float(), -1)
        tok = logp.argmax(-1) if greedy else multinomial(logp.exp(), generator)
        live = ~done
        tokens[:, t] = torch.where(live, tok, pad_id)
        logprobs[:, t] = torch.where(live, logp.gather(-1, tok[:, None]).squeeze(-1), 0.0)
        lengths += live.long()
        hit = live & torch.isin(tok, stop_ids)
        stopped |= hit
        done = done | hit | (lengths >= limits)
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=device)], 1)
        out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos, past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1]
        next_pos = next_pos + 1
    width = int(lengths.max())
    return Sampled(tokens[:, :width].cpu(), logprobs[:, :width].cpu(), lengths.cpu(), stopped.cpu())


@dataclass
class Trial:
    """One trial as built by :func:`run_trials` (lists are token-aligned).

    ``action`` is 1 on policy tokens; ``episode`` holds the episode index of each
    token (-1 on prompt and observation tokens). ``episode_ends[j]`` is the stream
    position of episode j's last token; ``answer_episode`` the index of the episode
    that gave the final answer (committed or forced).

    ``sample_logprobs``: the sampling pass's log pi of each action token (0 elsewhere).
    ``sample_values``: the critic's V(x_<t) of each action token, computed by the engine
    from the last hidden state of the forward pass it sampled that token from (0
    elsewhere; :func:`run_trials` with ``value_head``); None when the engine computed none.
    """

    problem_id: str
    group: int
    ids: list[int] = field(default_factory=list)
    action: list[int] = field(default_factory=list)
    episode: list[int] = field(default_factory=list)
    sample_logprobs: list[float] = field(default_factory=list)
    sample_values: list[float] | None = None
    episode_ends: list[int] = field(default_factory=list)
    episode_texts: list[str] = field(default_factory=list)
    episode_correct: list[bool] = field(default_factory=list)
    answer_episode: int = -1
    answer: str | None = None
    outcome: float = 0.0
    forced: bool = False
    policy_tokens: int = 0
    env: object = None  # the unwrapped environment, still holding this trial's problem
    cache: object = None  # engine.TrialCache when the engine was asked to keep it (for the meta-prover)

    def append(self, tokens: list[int], is_action: bool, episode: int, logprobs: list[float] | None = None,
               values: list[float] | None = None) -> None:
        """Append ``tokens`` (policy tokens if ``is_action``, with their sampling ``logprobs``
        and, if the engine computed them, ``values``; inserted tokens get 0 for both)."""
        if values is not None or self.sample_values is not None:  # values on every episode of the trial or none
            if values is not None and len(values) != len(tokens):
                raise ValueError(f"Trial.append: {len(values)} values for {len(tokens)} tokens")
            if self.sample_values is None:
                if self.policy_tokens:
                    raise ValueError("Trial.append: values for an episode after episodes without values")
                self.sample_values = [0.0] * len(self.ids)
            if values is None:
                if is_action:
                    raise ValueError("Trial.append: an episode without values after episodes with values")
                values = [0.0] * len(tokens)
            self.sample_values += values
        self.ids += tokens
        self.action += [int(is_action)] * len(tokens)
        self.episode += [episode if is_action else -1] * len(tokens)
        self.sample_logprobs += logprobs if logprobs is not None else [0.0] * len(tokens)
        if is_action:
            self.policy_tokens += len(tokens)
            self.episode_ends.append(len(self.ids) - 1)


class StreamCodec:
    """Tokenisation of the text pieces around sampled tokens, and the stop ids."""

    def __init__(self, tokenizer, delimiter: str, forced_answer_text: str):
        self.tokenizer = tokenizer
        self.delimiter = delimiter
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        # Every vocabulary entry whose text contains the delimiter ends an episode, so a
        # merged token such as ".\n" stops it too.
        vocab_text = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        decoded = [tokenizer.convert_tokens_to_string([t]) if t is not None else "" for t in vocab_text]
        delim_ids = [i for i, s in enumerate(decoded) if delimiter and delimiter in s]
        if not delim_ids:
            raise ValueError(f"episode delimiter {delimiter!r} is not in the tokenizer's vocabulary")
        self.delimiter_ids = set(delim_ids)
        self.stop_ids = torch.tensor(sorted(self.delimiter_ids | ({self.eos_id} if self.eos_id is not None else set())))
        self.delimiter_token = self.encode(delimiter)
        self.forced_ids = self.encode(forced_answer_text)

    def encode(self, text: str, special: bool = False) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=special) if text else []

    def episode_text(self, tokens: list[int]) -> str:
        """The text handed to the environment: the episode without its delimiter or EOS."""
        if tokens and tokens[-1] == self.eos_id:
            tokens = tokens[:-1]
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        if tokens and tokens[-1] in self.delimiter_ids:
            text = text[: text.rfind(self.delimiter)] if self.delimiter in text else text
        return text

    def forced_prefix(self, stream: list[int]) -> list[int]:
        """Tokens that turn the policy into the meta-prover after ``stream``."""
        ends_clean = bool(stream) and stream[-1] in self.delimiter_ids
        return ([] if ends_clean else self.delimiter_token) + self.forced_ids


def run_trials(
    model: torch.nn.Module,
    codec: StreamCodec,
    envs: list,
    resets: list[dict],
    groups: list[int],
    budget: BudgetConfig,
    generator: torch.Generator | None = None,
    engine="cached",
    keep_cache: bool = False,
    keys: torch.Tensor | None = None,
    value_head: torch.nn.Module | None = None,
) -> list[Trial]:
    """Play one trial in each environment, all trials batched.

    ``envs`` are Gymnasium environments (as made by ``gymnasium.make``); ``resets``
    the keyword arguments of each ``reset`` (``seed``, ``options``); ``groups`` the
    problem group of each trial (trials of one problem share it). ``engine`` is a
    :class:`metarl_llm.engine.Engine` or the name of one (``cached``: the KV cache kept
    across episodes; ``reencode``; ``hf_generate``); ``keep_cache`` keeps each trial's KV cache
    on ``trial.cache`` for the meta-prover (``cached`` only); ``keys`` [N] fixes the
    trials' sampling keys (default: drawn from ``generator``). ``value_head``: a shared
    critic's head (``ActorCritic.value_head``, [..., H] -> [..., 1]); the engine then also
    applies it to the last hidden state of every forward pass it samples from and stores
    each action token's value on ``Trial.sample_values`` (the values ``ActorCritic.score``
    gives, without its forward pass); an engine that cannot (``supports_values`` False)
    is an error.

    Budget: an episode ends at the delimiter, EOS or ``max_episode_tokens``; the trial
    ends when the environment terminates it (a committed answer). When the policy
    emits EOS without committing, spends ``max_total_tokens``, or the environment
    reaches ``max_episodes``, the forced-answer text is inserted and the next episode
    (at most ``answer_max_tokens``) is the final answer.
    """
    from metarl_llm.engine import get_engine

    if isinstance(engine, str):
        engine = get_engine(engine)
    extra = {}
    if value_head is not None:
        if not getattr(engine, "supports_values", False):
            raise ValueError(f"rollout engine {getattr(engine, 'name', type(engine).__name__)!r} cannot compute the "
                             f"critic's values while sampling (supports_values is False); score them with a forward pass")
        extra["value_head"] = value_head
    return engine.run_trials(model, codec, envs, resets, groups, budget, generator, keep_cache=keep_cache, keys=keys, **extra)
