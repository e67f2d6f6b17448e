"""The environment contract shared by every metarl-llm environment.

Vocabulary (see docs/design.md): one Gymnasium *episode* (``reset`` -> terminated) is
one **trial** here: everything the policy writes for one problem. One ``step``
consumes one **episode** of that trial (an attempt, a check, a revision).

Protocol of a trial, in text::

    prompt (ends with the episode delimiter)
    episode 0 text <delim> [observation 0]
    episode 1 text <delim> [observation 1]
    ...
    "... Answer: 42"                      <- an episode that commits a final answer

- An episode *commits* when its text contains ``answer_marker``; the text after the
  last marker is the final answer, the trial terminates and ``reward`` is the outcome.
  With ``retry_wrong_answers=True`` a committed answer whose outcome is below 1 ends the
  trial only at the last episode (``max_episodes``): before it, the episode is a failed
  attempt (``info["attempt"]`` holds its answer), the observation is the feedback (with
  ``feedback=True``) and the next episode follows. The first correct answer ends the trial
  with outcome 1; a wrong one at the last episode with its outcome. This is the classic
  RL^2 setting: several attempts at one problem, each informed by the earlier ones.
- Otherwise the observation is ``""`` (no feedback, the default) or, with
  ``feedback=True``, a short verdict on the episode.
- When ``max_episodes`` episodes have been written without a committed answer, the
  environment *forces* one: the observation is ``forced_answer_text`` and the next
  step's whole text is taken as the final answer (this is the meta-prover). A rollout
  that runs out of *tokens* calls :meth:`EpisodicTextEnv.force_answer` to do the same.
  ``info["forcing_answer"]`` says that the returned observation forces the answer.
- ``step`` receives an episode's text *without* the trailing delimiter.
- :meth:`EpisodicTextEnv.forced_outcome` scores a forced answer as the trial would be
  scored at that point (the episodes so far plus that answer): the meta-prover's J.

Subclasses implement the problem source, the grader and the expert traces; the
trial bookkeeping lives here so every environment behaves the same way.
"""

from __future__ import annotations

import abc
import copy
import hashlib
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np

SPLITS = ("train", "test")


class UnicodeText(gym.spaces.Space[str]):
    """A space of arbitrary Unicode strings of at most ``max_length`` characters.

    Gymnasium's ``spaces.Text`` accepts only an explicit character set (alphanumeric by
    default), which rejects ordinary prompts; model output can be any text at all.
    """

    def __init__(self, max_length: int = 100_000, seed: int | None = None):
        if max_length <= 0:
            raise ValueError(f"UnicodeText: max_length must be positive, got {max_length}")
        self.max_length = int(max_length)
        super().__init__(shape=None, dtype=None, seed=seed)

    @property
    def is_np_flattenable(self) -> bool:
        return False

    def sample(self, mask: Any = None, probability: Any = None) -> str:
        n = int(self.np_random.integers(0, min(self.max_length, 64) + 1))
        codes = self.np_random.integers(32, 127, size=n)
        return "".join(chr(int(c)) for c in codes)

    def contains(self, x: Any) -> bool:
        return isinstance(x, str) and len(x) <= self.max_length

    def __repr__(self) -> str:
        return f"UnicodeText(max_length={self.max_length})"

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, UnicodeText) and other.max_length == self.max_length

    def __hash__(self) -> int:
        return hash((UnicodeText, self.max_length))


@dataclass(frozen=True)
class Problem:
    """One problem instance.

    ``reference`` is the gold answer text: for graders and training-time estimators
    only, it never enters the policy's context. ``data`` holds whatever else the
    environment's grader or expert traces need.
    """

    problem_id: str
    prompt: str
    reference: str
    data: dict = field(default_factory=dict)


def split_of(key: str, test_fraction: float) -> str:
    """Deterministic train/test assignment by content hash.

    Splitting on a hash of the problem's canonical content makes train and held-out
    problems disjoint by construction: the same content always lands in one split.
    """
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return "test" if (h / 2**64) < test_fraction else "train"


class EpisodicTextEnv(gym.Env[str, str], abc.ABC):
    """Base class: a problem per trial, an episode per step, text in and out.

    Subclasses implement ``_problem(index)`` (deterministic problem ``index`` of
    ``self.split``), ``num_problems`` (``None`` for an unbounded generator),
    ``score``, ``score_episode`` and ``expert_trace``.
    """

    metadata = {"render_modes": []}
    # Whether :meth:`expert_trace` may return a trial that fails: a search that does not know the
    # gold and ends, when its budget is spent, with the forced answer (a guess). The warm start
    # then trains on the expert's trials as they come, not only on its successes (a filter on
    # success would tell the policy the gold: :class:`envs.inverse.InverseEnv`).
    expert_may_fail: bool = False

    def __init__(
        self,
        split: str = "train",
        max_episodes: int = 3,
        answer_marker: str = "Answer:",
        forced_answer_text: str = "Answer:",
        episode_delimiter: str = "\n",
        feedback: bool = False,
        retry_wrong_answers: bool = False,
        max_text_length: int = 100_000,
    ):
        if split not in SPLITS:
            raise ValueError(f"{type(self).__name__}: unknown split {split!r}; expected one of {SPLITS}")
        if max_episodes < 1:
            raise ValueError(f"{type(self).__name__}: max_episodes must be >= 1, got {max_episodes}")
        if not answer_marker:
            raise ValueError(f"{type(self).__name__}: answer_marker must be non-empty")
        self.split = split
        self.max_episodes = int(max_episodes)
        self.answer_marker = answer_marker
        self.forced_answer_text = forced_answer_text
        self.episode_delimiter = episode_delimiter
        self.feedback = bool(feedback)
        self.retry_wrong_answers = bool(retry_wrong_answers)
        self.observation_space = UnicodeText(max_text_length)
        self.action_space = UnicodeText(max_text_length)
        self.problem: Problem | None = None
        self._episodes: list[str] = []
        self._forced = False
        self._done = True

    # ----------------------------------------------------------- subclass hooks
    @property
    @abc.abstractmethod
    def num_problems(self) -> int | None:
        """Number of problems in this split, or None when the source is unbounded."""

    @abc.abstractmethod
    def _problem(self, index: int) -> Problem:
        """The deterministic problem ``index`` of ``self.split``."""

    @abc.abstractmethod
    def score(self, answer_text: str) -> float:
        """Score a final answer for the current problem, in [0, 1].

        Deterministic, pure, bounded in time and safe on any string: never evaluates
        model text as code. Garbage scores 0.
        """

    @abc.abstractmethod
    def score_episode(self, episode_text: str) -> float:
        """Score one uncommitted episode on its own (drives feedback and per-episode metrics)."""

    @abc.abstractmethod
    def expert_trace(self, rng: np.random.Generator, n_failed: int, variety: float) -> list[str]:
        """Episode texts of an expert trial for the current problem (delimiters excluded).

        ``n_failed`` failed episodes precede the correct one; the last episode commits
        the correct answer. ``variety`` in [0, 1] sets heterogeneity: 0 gives the one
        canonical (focused) form, 1 the most varied forms of both failed and correct
        episodes. Where ``expert_may_fail`` is True the expert's own search decides how
        many episodes fail, and a trial that spends ``max_episodes`` without committing
        ends with the text of its forced answer as one more episode.
        """

    def outcome(self, episodes: list[str], answer: str | None) -> float:
        """The trial's outcome reward; by default the score of the final answer."""
        return 0.0 if answer is None else self.score(answer)

    def forced_outcome(self, episodes: list[str], answer_text: str) -> float:
        """The outcome the trial would get if, after ``episodes``, it were forced to answer
        with ``answer_text`` (the text the policy writes after the forced-answer text):
        the answer is parsed as :meth:`step` parses a forced episode, and scored with the
        episodes so far by :meth:`outcome`. This is what the meta-prover's J estimates."""
        answer = self.parse_answer(answer_text) or answer_text.strip()
        return float(self.outcome(list(episodes), answer or None))

    def feedback_text(self, episode_text: str) -> str:
        """Observation after an uncommitted episode (or, with ``retry_wrong_answers``, a wrong
        committed one) when ``feedback=True``."""
        ok = self.score_episode(episode_text) >= 1.0
        return ("[correct]" if ok else "[wrong]") + self.episode_delimiter

    # -------------------------------------------------------------- public hooks
    @property
    def reference_answer(self) -> str:
        """Gold answer of the current problem (training-time estimators only)."""
        if self.problem is None:
            raise RuntimeError(f"{type(self).__name__}: call reset() before reading reference_answer")
        return self.problem.reference

    def answer_target(self) -> tuple[str, bool]:
        """Canonical text of a correct forced answer, and whether the answer must end there.

        The ``likelihood`` estimator of J (metarl_llm.rl.bonus) scores the probability that
        the meta-prover writes exactly this text after the forced-answer text (followed
        by a stop token when the flag is True). Where a problem has several correct
        surface forms, that probability is a lower bound on J. Default: a space and the
        reference answer, then a stop, the form the expert traces teach.
        """
        return " " + self.reference_answer, True

    def grader(self) -> "ProblemGrader":
        """The grading of the current problem, detached from this environment (which the next
        ``reset`` moves to another problem): what a finished trial keeps."""
        return ProblemGrader(self)

    def force_answer(self) -> str:
        """Turn the policy into the meta-prover: the next step is the final answer.

        Returns the forced-answer text, which the rollout inserts as observation tokens.
        """
        if self._done:
            raise RuntimeError(f"{type(self).__name__}: force_answer() on a finished trial; call reset()")
        self._forced = True
        return self.forced_answer_text

    def parse_answer(self, episode_text: str) -> str | None:
        """The committed answer of an episode (text after the last marker), or None."""
        pos = episode_text.rfind(self.answer_marker)
        if pos < 0:
            return None
        return episode_text[pos + len(self.answer_marker) :].strip()

    # ------------------------------------------------------------- gymnasium API
    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[str, dict]:
        """Draw a problem. ``options={"index": i}`` selects problem ``i`` of the split."""
        super().reset(seed=seed)
        options = dict(options or {})
        index = options.pop("index", None)
        if options:
            raise ValueError(f"{type(self).__name__}.reset: unknown option(s) {sorted(options)}; known: ['index']")
        n = self.num_problems
        if index is None:
            index = int(self.np_random.integers(0, n if n is not None else 2**31 - 1))
        else:
            index = int(index)
            if index < 0 or (n is not None and index >= n):
                raise IndexError(
                    f"{type(self).__name__}: problem index {index} out of range for split {self.split!r} ({n} problems)"
                )
        self.problem = self._problem(index)
        self._episodes = []
        self._forced = False
        self._done = False
        return self.problem.prompt, {"problem_id": self.problem.problem_id, "split": self.split, "index": index}

    def step(self, action: str) -> tuple[str, float, bool, bool, dict]:
        if self.problem is None or self._done:
            raise RuntimeError(f"{type(self).__name__}: step() on a finished trial; call reset() first")
        if not isinstance(action, str):
            raise TypeError(f"{type(self).__name__}.step: episode text must be str, got {type(action).__name__}")
        if len(action) > self.action_space.max_length:
            raise ValueError(
                f"{type(self).__name__}.step: episode text of {len(action)} characters exceeds max_text_length={self.action_space.max_length}"
            )
        index = len(self._episodes)
        self._episodes.append(action)
        forced = self._forced
        answer = self.parse_answer(action) if not forced else (self.parse_answer(action) or action.strip())
        info: dict[str, Any] = {
            "episode_index": index,
            "answer": answer,
            "forced": forced,
            "problem_id": self.problem.problem_id,
        }
        last = index + 1 >= self.max_episodes
        if answer is not None:
            # An empty answer counts as no answer; earlier episodes may still matter
            # (e.g. planted_subseq succeeds when any episode holds the gold).
            reward = float(self.outcome(self._episodes[:-1], answer or None))
            info["correct"] = reward >= 1.0
            if forced or reward >= 1.0 or last or not self.retry_wrong_answers:
                self._done = True
                return "", reward, True, False, info
            info["attempt"], info["answer"] = answer, None  # a failed attempt: the trial goes on
        else:
            info["correct"] = self.score_episode(action) >= 1.0
        info["forcing_answer"] = last
        if info["forcing_answer"]:
            obs = self.force_answer()
        elif self.feedback:
            obs = self.feedback_text(action)
        else:
            obs = ""
        return obs, 0.0, False, False, info


# ------------------------------------------------------------------ grading a finished trial


class ProblemGrader:
    """The grading functions of one problem, detached from the environment that served it.

    A trial keeps this (``Trial.grader``), not the environment: an environment is reset to
    the next problem as soon as its trial ends, while the trial's bonus, J estimates,
    majority votes and verifier labels are computed later. A grader never changes problem.
    It holds a private shallow copy of the environment taken at :meth:`EpisodicTextEnv.grader`
    (sharing the problem source and any grading worker, which are read-only) and exposes only
    the pure grading methods; it has no ``reset`` or ``step``.
    """

    def __init__(self, env: EpisodicTextEnv):
        if env.problem is None:
            raise RuntimeError(f"{type(env).__name__}: call reset() before taking a grader")
        frozen = copy.copy(env)
        frozen._episodes, frozen._done = [], True  # its own (finished) trial state: step() on it raises
        self._env = frozen
        self.problem: Problem = env.problem

    @property
    def reference_answer(self) -> str:
        """Gold answer of the problem (training-time estimators only)."""
        return self.problem.reference

    def score(self, answer_text: str) -> float:
        """:meth:`EpisodicTextEnv.score` of a final answer to this problem."""
        return self._env.score(answer_text)

    def score_episode(self, episode_text: str) -> float:
        """:meth:`EpisodicTextEnv.score_episode` of one uncommitted episode."""
        return self._env.score_episode(episode_text)

    def outcome(self, episodes: list[str], answer: str | None) -> float:
        """:meth:`EpisodicTextEnv.outcome`: the outcome of a trial with these episodes and answer."""
        return self._env.outcome(episodes, answer)

    def forced_outcome(self, episodes: list[str], answer_text: str) -> float:
        """:meth:`EpisodicTextEnv.forced_outcome`: the outcome if forced to answer ``answer_text`` after ``episodes``."""
        return self._env.forced_outcome(episodes, answer_text)

    def answer_target(self) -> tuple[str, bool]:
        """:meth:`EpisodicTextEnv.answer_target`: the canonical correct forced answer."""
        return self._env.answer_target()

    def parse_answer(self, episode_text: str) -> str | None:
        """:meth:`EpisodicTextEnv.parse_answer`: the committed answer of an episode, or None."""
        return self._env.parse_answer(episode_text)


# ------------------------------------------------------------------ failures


class EnvironmentFailure(RuntimeError):
    """An environment (its grader, parser or reward) raised on a model's text.

    Carries what is needed to reproduce it: the problem id, the offending text, the
    episode index and the original exception (``__cause__``)."""

    def __init__(self, problem_id: str, text: str, episode: int, cause: BaseException):
        self.problem_id, self.text, self.episode = problem_id, text, episode
        self.cause_repr = f"{type(cause).__name__}: {cause}"
        super().__init__(
            f"environment failed on problem {problem_id!r}, episode {episode} ({self.cause_repr}); text: {text[:200]!r}"
        )


class FailureGuard(gym.Wrapper):
    """Makes environment exceptions loud, or maps them to a score, never silent.

    ``on_error="raise"`` (default): an exception in ``step`` becomes an
    :class:`EnvironmentFailure` naming the problem and the text. ``on_error="score"``:
    the trial ends there with reward ``error_score`` and ``info["error"]`` set, and the
    failure is counted in ``self.failures`` (the trainer logs the count)."""

    def __init__(self, env: gym.Env, on_error: str = "raise", error_score: float = 0.0):
        if on_error not in ("raise", "score"):
            raise ValueError(f"reward.on_error={on_error!r}; expected 'raise' or 'score'")
        super().__init__(env)
        self.on_error, self.error_score = on_error, float(error_score)
        self.failures = 0

    def step(self, action):
        try:
            return self.env.step(action)
        except Exception as e:  # noqa: BLE001 - any grader failure is reported, with its cause
            base = self.env.unwrapped
            problem_id = base.problem.problem_id if getattr(base, "problem", None) is not None else "?"
            episode = len(getattr(base, "_episodes", [])) - 1
            if self.on_error == "raise":
                raise EnvironmentFailure(problem_id, action, episode, e) from e
            self.failures += 1
            base._done = True
            info = {
                "problem_id": problem_id,
                "answer": None,
                "correct": False,
                "forced": False,
                "episode_index": episode,
                "error": f"{type(e).__name__}: {e}",
            }
            return "", self.error_score, True, False, info
