"""An inverse problem whose answers are easy to check and hard to produce: find x with
(a*x + b) mod m = y.

The verification-asymmetric task of the epistemic-POMDP setting without feedback: computing
f(x) = (a*x + b) mod m for a candidate x is one multiplication, an addition and a last digit
(for m = 10), which a small model learns from its expert traces; producing x needs the inverse
of a modulo m, which the traces never show. The expert searches: it proposes a candidate,
checks it, and revises, so a policy that checks well and does not repeat itself solves the
problem with probability that grows with its number of episodes, even though no reply from the
environment tells it anything.

The default expert (``expert_search="blind"``) does not know the gold: its order of candidates
does not depend on it, and when its budget is spent it guesses. A trace that knows the
gold, or that is kept only when it succeeds, tells the policy the gold: the informed expert's
first candidate is the gold in every trace without a failed episode, and success-filtered blind
traces put the gold first in 1 of (n_failed_max + 1) traces, not 1 in m.
"""

from __future__ import annotations

import functools
import math
import re

import numpy as np

from envs.base import EpisodicTextEnv, Problem, split_of

_INT_RE = re.compile(r"\s*(-?\d{1,9})(?!\d)")  # a leading integer of at most 9 digits, whole
_TRY_RE = re.compile(r"try (-?\d{1,9})")
MAX_ANSWER_CHARS = 64  # only the start of an answer is parsed (bounded time on any string)


@functools.lru_cache(maxsize=16)
def _problems(modulus: int, test_fraction: float, split: str) -> tuple[tuple[int, int, int], ...]:
    """Every (a, b, y) of ``split``: a a unit modulo ``modulus``, b and y residues, split by hash."""
    out = []
    for a in range(1, modulus):
        if math.gcd(a, modulus) != 1:
            continue
        for b in range(modulus):
            for y in range(modulus):
                if split_of(f"inverse:{modulus}:{a}:{b}:{y}", test_fraction) == split:
                    out.append((a, b, y))
    return tuple(out)


class InverseEnv(EpisodicTextEnv):
    """Find x with (a*x + b) mod m = y: propose, check, revise; no feedback needed.

    A Gymnasium episode (reset -> terminated) is one **trial**; one ``step`` consumes one
    **episode** (here: one candidate and its check).

    Example (m = 10; prompt, then episodes, one per line)::

        Prompt:    "7x+3=1 (mod 10)\\n"            (gold x = 4: 7*4+3 = 31)
        Episode 0: "try 2: 7*2+3=17 -> 7 no"
        Episode 1: "try 3: 7*3+3=24 -> 4 no"
        Episode 2: "try 4: 7*4+3=31 -> 1 Answer: 4"       (commits; reward 1.0)

    +--------------------+---------------------------------------------------------------+
    | Observation space  | ``UnicodeText``: the prompt, then ``""`` per episode (or a    |
    |                    | verdict with ``feedback=True``), or ``forced_answer_text``    |
    | Action space       | ``UnicodeText``: the text of one episode (no delimiter)       |
    | Reward             | 0 per uncommitted episode; at termination 1.0 iff the answer  |
    |                    | is an integer x with (a*x + b) mod m = y                      |
    | Termination        | an episode contains ``answer_marker``, or the forced answer   |
    | ``reset`` options  | ``{"index": i}``: problem ``i`` of the split                  |
    +--------------------+---------------------------------------------------------------+

    Keyword arguments (``gymnasium.make("metarl/Inverse-v0", **kwargs)``): ``modulus`` (10; a
    problem is a unit a, residues b and y: 400 problems for m = 10), ``test_fraction`` (0.2:
    share of problems hashed into ``test``), and :class:`envs.base.EpisodicTextEnv`'s
    (``split``, ``max_episodes``, ``answer_marker``, ``forced_answer_text``,
    ``episode_delimiter``, ``feedback``, ``retry_wrong_answers``, ``max_text_length``).

    Expert traces (``expert_search``; an episode fits the default budget's 32 tokens of the
    character vocabulary for m = 10, except with ``write_comparison``: ``budget=fit``):

    - ``"blind"`` (default): a search that does not know the gold. Each candidate is, with
      probability ``variety``, drawn uniformly among the residues not yet tried, otherwise
      (focused) the next one not yet tried counting up from y (y, y + 1, ... mod m: over the
      problems the start is uniform, so the focused traces check every candidate; counting from
      0, the base learned only the checks of 0, 1 and 2). Each is checked; the first whose
      check gives y is committed (``... -> 1 Answer: 4``), the others end ``no``. When the
      trial's ``max_episodes`` are spent without a commit, the trace ends with the forced
      answer, the next candidate unchecked (`` 3``): a guess, right 1 time in m - max_episodes.
      ``n_failed`` is not used: the search decides it. The gold's position in the search is
      uniform in 1..m over the problems and independent of the gold (focused: a fixed function
      of the problem, (gold - y) mod m + 1). So the traces fail (``expert_may_fail``), and the
      warm start trains on them as they come.
    - ``"informed"``: ``n_failed`` wrong candidates, then the gold and the committed answer.
      ``variety`` is the probability that each failed candidate is drawn at random among the
      unused wrong residues; otherwise (focused) the search counts up by one to the gold:
      x0 = gold - n_failed, x0 + 1, ... (mod m). It knows the gold, and its traces show it.

    ``write_comparison`` (default False) writes each check's result beside y, copied from the
    prompt: ``try 2: 7*2+3=17 -> 7 vs 1 no`` and ``try 4: 7*4+3=31 -> 1 vs 1 Answer: 4``. The
    decision to commit then compares two symbols four characters apart, where without it the
    policy must compare its result with y in the prompt. bench/inverse_probe.py measured the
    warm-started base (1000 steps, seed 0, 3 episodes): without it, 38 commits after a check that
    does not give y and 76 passing checks left uncommitted; with it, none and 1
    (bench/results/adaptation_probe_blind_long.txt, adaptation_probe_blind_compare.txt).
    """

    EXPERT_SEARCHES = ("blind", "informed")

    def __init__(
        self,
        *,
        modulus: int = 10,
        test_fraction: float = 0.2,
        expert_search: str = "blind",
        write_comparison: bool = False,
        **base_kwargs,
    ):
        super().__init__(**base_kwargs)
        name = type(self).__name__
        if expert_search not in self.EXPERT_SEARCHES:
            raise ValueError(f"{name}: expert_search must be one of {self.EXPERT_SEARCHES}, got {expert_search!r}")
        self.expert_search = expert_search
        self.expert_may_fail = expert_search == "blind"
        self.write_comparison = bool(write_comparison)
        if modulus < 2:
            raise ValueError(f"{name}: modulus must be >= 2, got {modulus}")
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"{name}: test_fraction must be in (0, 1), got {test_fraction}")
        self.modulus = int(modulus)
        self.test_fraction = float(test_fraction)
        if not _problems(self.modulus, self.test_fraction, self.split):
            raise ValueError(f"{name}: no {self.split} problems for modulus={modulus}, test_fraction={test_fraction}")

    @property
    def num_problems(self) -> int | None:
        return len(_problems(self.modulus, self.test_fraction, self.split))

    def _problem(self, index: int) -> Problem:
        a, b, y = _problems(self.modulus, self.test_fraction, self.split)[index]
        x = (pow(a, -1, self.modulus) * (y - b)) % self.modulus
        return Problem(
            problem_id=f"inverse:{a}x+{b}={y}mod{self.modulus}",
            prompt=f"{a}x+{b}={y} (mod {self.modulus}){self.episode_delimiter}",
            reference=str(x),
            data={"a": a, "b": b, "y": y},
        )

    # ------------------------------------------------------------------ grading
    def _solves(self, x: int) -> bool:
        d = self.problem.data
        return (d["a"] * x + d["b"]) % self.modulus == d["y"]

    def score(self, answer_text: str) -> float:
        """1.0 iff the answer starts with an integer x (at most 9 digits) that solves (a*x + b) mod m
        = y (parsed, never evaluated)."""
        if not isinstance(answer_text, str):
            return 0.0
        found = _INT_RE.match(answer_text[:MAX_ANSWER_CHARS])
        return float(found is not None and self._solves(int(found.group(1))))

    def score_episode(self, episode_text: str) -> float:
        """The committed answer's score or, in an uncommitted episode, that of its last candidate
        ("try x"; without one, the episode read as an answer)."""
        if not isinstance(episode_text, str):
            return 0.0
        answer = self.parse_answer(episode_text)
        if answer is not None:
            return self.score(answer)
        tries = _TRY_RE.findall(episode_text[-4 * MAX_ANSWER_CHARS :])
        return float(self._solves(int(tries[-1]))) if tries else self.score(episode_text)

    # ------------------------------------------------------------ expert traces
    def check_text(self, x: int) -> str:
        """The check of candidate x: ``try 4: 7*4+3=31 -> 1``, and with ``write_comparison``
        ``try 4: 7*4+3=31 -> 1 vs 1`` (the result beside y)."""
        d = self.problem.data
        v = d["a"] * x + d["b"]
        text = f"try {x}: {d['a']}*{x}+{d['b']}={v} -> {v % self.modulus}"
        return f"{text} vs {d['y']}" if self.write_comparison else text

    def expert_trace(self, rng: np.random.Generator, n_failed: int, variety: float) -> list[str]:
        if not 0 <= n_failed < self.max_episodes:
            raise ValueError(f"expert_trace: n_failed must be in [0, max_episodes={self.max_episodes}), got {n_failed}")
        if not 0.0 <= variety <= 1.0:
            raise ValueError(f"expert_trace: variety must be in [0, 1], got {variety}")
        if self.expert_search == "blind":
            return self._blind_trace(rng, variety)
        if n_failed >= self.modulus:
            raise ValueError(f"expert_trace: only {self.modulus - 1} wrong candidates exist, asked for {n_failed}")
        m, gold = self.modulus, int(self.reference_answer)
        counting = [(gold - n_failed + j) % m for j in range(n_failed)]
        used: set[int] = set()
        episodes = []
        for j in range(n_failed):
            if rng.random() < variety:
                free = [x for x in range(m) if x != gold and x not in used and x not in counting[j + 1 :]]
                x = int(rng.choice(free))
            else:
                x = counting[j] if counting[j] not in used else next(v for v in range(m) if v != gold and v not in used)
            used.add(x)
            episodes.append(f"{self.check_text(x)} no")
        episodes.append(f"{self.check_text(gold)} {self.answer_marker} {gold}")  # at most 31 characters for m = 10
        return episodes

    def _blind_trace(self, rng: np.random.Generator, variety: float) -> list[str]:
        """The blind search's trial (class docstring): it reads the gold only through its checks."""
        d = self.problem.data
        untried = [(d["y"] + i) % self.modulus for i in range(self.modulus)]  # the focused order: from y
        episodes = []
        while untried:
            # one draw per candidate whatever variety is, so focused and varied traces of a seed
            # use the generator alike; rng.integers only when the draw picks at random
            x = untried.pop(int(rng.integers(len(untried))) if rng.random() < variety else 0)
            if len(episodes) == self.max_episodes:  # budget spent: the forced answer, a guess
                return episodes + [f" {x}"]
            if self._solves(x):
                return episodes + [f"{self.check_text(x)} {self.answer_marker} {x}"]
            episodes.append(f"{self.check_text(x)} no")
        raise AssertionError(f"no residue solves {self.problem.problem_id}")  # a is a unit: one x does
