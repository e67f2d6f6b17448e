"""Trials as token streams, and the codec between text and tokens.

The MDP the trainer optimises (docs/design.md section 5)
---------------------------------------------------
The state is every token so far; an **action is one policy token**. Tokens that the
environment inserts (feedback observations, the forced-answer text) and the prompt
are part of the transition, not actions: ``action_mask`` is 0 on them and no loss,
advantage or reward is ever placed there. Episode ends are *not* terminal (return
flows across episodes, the point of RL^2); only the trial end is.

Token in, token out: the stream is the concatenation of the tokenised prompt, the
sampled tokens (kept as sampled, never decoded and re-encoded) and the tokenised
observations. Text is decoded only to hand an episode to the environment.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from metarl_llm.config import SegmentConfig
from metarl_llm.core.chat import ChatFormat, ChatState
from metarl_llm.core.segment import Segmenter, TokenTexts, make_segmenter


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
    grader: object = None  # envs.base.ProblemGrader: the grading of this trial's problem (never reset to another)
    cache: object = None  # engine.TrialCache when the engine was asked to keep it (for the meta-prover)
    chat: ChatState | None = None  # the conversation, when prompts and feedback are chat turns (StreamCodec.chat)

    def append(
        self,
        tokens: list[int],
        is_action: bool,
        episode: int,
        logprobs: list[float] | None = None,
        values: list[float] | None = None,
    ) -> None:
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
    """Tokenisation of the text pieces around sampled tokens, and the stop ids.

    ``chat``: when given (:class:`metarl_llm.core.chat.ChatFormat`), prompts are rendered through
    the tokenizer's chat template (:meth:`prompt_ids`); otherwise they are encoded as plain text.

    ``segment``: how episodes are cut (:class:`metarl_llm.config.SegmentConfig`; default: at the
    delimiter). With the ``delimiter`` rule generation stops at every token holding the delimiter
    (``stop_ids``: those and EOS; ``segmenter`` None). With any other rule generation stops only at
    EOS (``stop_ids``) or the token budget, and ``segmenter`` cuts the generated tokens into
    episodes afterwards (:func:`metarl_llm.rollout.base.finish_generation`). ``max_episodes``: the
    markers rule's cap when the config sets none (the run's ``budget.max_episodes``)."""

    def __init__(
        self,
        tokenizer,
        delimiter: str,
        forced_answer_text: str,
        chat: ChatFormat | None = None,
        segment: SegmentConfig | None = None,
        max_episodes: int = 0,
    ):
        self.tokenizer = tokenizer
        self.chat = chat
        self.delimiter = delimiter
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.texts = TokenTexts(tokenizer)  # every id's text, decoded once
        # Every vocabulary entry whose text contains the delimiter ends an episode, so a
        # merged token such as ".\n" stops it too.
        delim_ids = [i for i, s in enumerate(self.texts.texts) if delimiter and delimiter in s]
        if not delim_ids:
            raise ValueError(f"episode delimiter {delimiter!r} is not in the tokenizer's vocabulary")
        self.delimiter_ids = set(delim_ids)
        self.segment = segment if segment is not None else SegmentConfig(delimiter=delimiter)
        # None: episodes end at the delimiter as they are sampled; else the rule that cuts a generated trial
        self.segmenter: Segmenter | None = make_segmenter(self.segment, self.texts, max_episodes) if self.segment.after else None
        eos = {self.eos_id} if self.eos_id is not None else set()
        self.stop_ids = torch.tensor(sorted(eos if self.segmenter is not None else self.delimiter_ids | eos), dtype=torch.long)
        self.delimiter_token = self.encode(delimiter)
        self.forced_ids = self.encode(forced_answer_text)

    def prompt_ids(self, prompt: str) -> list[int]:
        """The prompt's tokens: the chat template's rendering with the generation prompt (with ``chat``),
        else the text with the tokenizer's special tokens (BOS) added."""
        return self.start(prompt)[0]

    def start(self, prompt: str) -> tuple[list[int], ChatState | None]:
        """The prompt's tokens (:meth:`prompt_ids`) and, with ``chat``, the conversation they open."""
        if self.chat is None:
            return self.encode(prompt, special=True), None
        messages, ids = self.chat.start(prompt)
        return ids, ChatState(messages, len(ids))

    def reply_ids(self, stream: list[int], state: ChatState, observation: str) -> list[int]:
        """An environment reply (feedback) after ``stream`` as a chat user turn: the tokens the template
        adds after the stream (closing the open assistant turn, the user turn, the next generation
        prompt), checked to extend it exactly (:meth:`ChatFormat.reply`). ``state`` is updated. The
        reply's trailing delimiter is dropped: in chat form the template's tokens end the turn."""
        text = observation[: -len(self.delimiter)] if self.delimiter and observation.endswith(self.delimiter) else observation
        turn = stream[state.turn_start :]
        if turn and turn[-1] == self.eos_id:  # the policy closed its turn itself
            turn = turn[:-1]
        assistant = self.tokenizer.decode(turn, skip_special_tokens=False)
        state.messages, ids = self.chat.reply(
            state.messages, self.tokenizer.decode(stream, skip_special_tokens=False), assistant, text
        )
        state.turn_start = len(stream) + len(ids)
        return ids

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

    def trace_generations(self, episodes: list[str], close: bool = True) -> list[tuple[list[int], list[str]]]:
        """An expert trace's policy tokens as a rollout samples them: (tokens, the episode texts the
        environment reads in them) per generation. With the delimiter rule one generation per
        episode, its text and the delimiter (EOS after the last when ``close``). With a rule that
        segments after generation one generation: the episodes joined by the rule's
        :meth:`~metarl_llm.config.SegmentConfig.trace_joiner`, then EOS, cut by the rule.

        ``close=False`` ends the last episode with the delimiter too: for an environment where a
        committed answer may be followed by more episodes (``retry_wrong_answers``), the policy
        cannot know which attempt is its last (that is the grade it has not seen), so the traces
        must not teach it to end the stream after the right one only. Measured before this
        option: traces whose right answer alone ended with EOS taught the policy to end its first
        attempt with EOS about two times in three; after a wrong one the rollout went on past an
        EOS no trace ever continued, and the policy's later attempts fell apart
        (bench/results/README.md, adaptation_hidden)."""
        if self.segmenter is None:
            return [
                (self.encode(text) + ([self.eos_id] if close and k == len(episodes) - 1 else self.delimiter_token), [text])
                for k, text in enumerate(episodes)
            ]
        tokens = self.encode(self.segment.trace_joiner().join(episodes)) + [self.eos_id]
        ends = self.segmenter(tokens)
        return [(tokens, [self.episode_text(tokens[a:b]) for a, b in zip([0] + ends[:-1], ends)])]

    def forced_prefix(self, stream: list[int]) -> list[int]:
        """Tokens that turn the policy into the meta-prover after ``stream``."""
        ends_clean = bool(stream) and stream[-1] in self.delimiter_ids
        return ([] if ends_clean else self.delimiter_token) + self.forced_ids
