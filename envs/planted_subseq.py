"""The contextualised planted subsequence task (Setlur et al. 2025, arXiv 2502.12118).

A didactic task whose difficulty and whose expert data's heterogeneity are both
controlled: the input is a random digit string, a hidden rule of the problem family
maps it to a short gold digit string, and a trial succeeds iff its token stream
contains the gold string. The rule is never shown; a policy must learn it.
"""

from __future__ import annotations

import functools

import numpy as np

from envs.base import EpisodicTextEnv, Problem, split_of

_SPLIT_CODE = {"train": 1, "test": 2}
_RULE_CODE = 3  # seeds [family_seed, code, ...] of the rule and of each split never coincide
_HIDDEN_CODE = 4  # [family_seed, split code, index, _HIDDEN_CODE]: a problem's hidden gold digits
_MAX_REDRAWS = 10_000
FEEDBACK_DETAILS = ("verdict", "digits")  # what feedback=True replies (PlantedSubseqEnv.feedback_text)
PROGRESS_EXPERTS = ("slow", "medium", "fast")  # expert_heterogeneity's experts (PlantedSubseqEnv.progress_expert)
EXPERT_PACES = ("progress", "length")  # what an expert's speed sets (PlantedSubseqEnv: expert_pace)


@functools.lru_cache(maxsize=64)
def _rule(family_seed: int, input_length: int, gold_length: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(positions, shifts) of a family: gold[i] = (x[positions[i]] + shifts[i]) % 10."""
    rng = np.random.default_rng([family_seed, _RULE_CODE])
    positions = rng.choice(input_length, size=gold_length, replace=gold_length > input_length)
    shifts = rng.integers(0, 10, size=gold_length)
    return tuple(int(p) for p in positions), tuple(int(s) for s in shifts)


@functools.lru_cache(maxsize=1 << 16)
def _planted_problem(
    family_seed: int, input_length: int, gold_length: int, split: str, test_fraction: float, index: int
) -> tuple[str, str]:
    """(digits, gold) of problem ``index`` of ``split``: drawn from its own seed until it hashes into ``split``."""
    rng = np.random.default_rng([family_seed, _SPLIT_CODE[split], index])
    for _ in range(_MAX_REDRAWS):
        digits = "".join(str(int(d)) for d in rng.integers(0, 10, size=input_length))
        if split_of(digits, test_fraction) == split:
            break
    else:
        raise ValueError(
            f"PlantedSubseqEnv: no {split} problem found in {_MAX_REDRAWS} draws "
            f"(input_length={input_length}, test_fraction={test_fraction}); use longer inputs"
        )
    positions, shifts = _rule(family_seed, input_length, gold_length)
    gold = "".join(str((int(digits[p]) + s) % 10) for p, s in zip(positions, shifts))
    return digits, gold


@functools.lru_cache(maxsize=1 << 16)
def _hidden_digits(family_seed: int, split: str, index: int, count: int) -> str:
    """The ``count`` hidden gold digits of problem ``index`` of ``split``: uniform, from their own seed,
    independent of the problem's input digits (so no rule, and no policy, can compute them)."""
    rng = np.random.default_rng([family_seed, _SPLIT_CODE[split], index, _HIDDEN_CODE])
    return "".join(str(int(d)) for d in rng.integers(0, 10, size=count))


class PlantedSubseqEnv(EpisodicTextEnv):
    """Contextualised planted subsequence: find the hidden gold digits of a digit string.

    A Gymnasium episode (reset -> terminated) is one **trial**; one ``step`` consumes
    one **episode** (here: one chunk of digits the policy tries).

    Each problem is ``input_length`` random digits. A rule fixed by ``family_seed``
    and never shown maps them to ``gold_length`` gold digits:
    ``gold[i] = (x[pos[i]] + shift[i]) % 10``. The trial succeeds iff its stream (any
    episode, or the final answer) contains the gold digits contiguously.

    Example (``family_seed=0``; prompt, then episodes, one per line)::

        Prompt:    "173592\\n"         (gold = x[2]+3, x[4]+5, x[5]+3 mod 10 = "645")
        Episode 0: "7560"              (a failed chunk: no gold inside)
        Episode 1: "Answer: 6450"      (commits; reward 1.0: the gold is inside)

    +--------------------+---------------------------------------------------------------+
    | Observation space  | ``UnicodeText``: prompt = the digits + ``episode_delimiter``; |
    |                    | then ``""`` per episode, or ``"[correct]"``/``"[wrong]"``     |
    |                    | with ``feedback=True``, or ``forced_answer_text``             |
    | Action space       | ``UnicodeText``: the text of one episode (no delimiter)       |
    | Reward             | 0 per uncommitted episode; at termination the outcome: 1.0    |
    |                    | iff an earlier episode or the final answer contains the gold  |
    | Termination        | an episode contains ``answer_marker`` (the text after it is   |
    |                    | the answer), or the forced answer after ``max_episodes``      |
    | Truncation         | never (the forced answer ends a trial)                        |
    | ``reset`` options  | ``{"index": i}``: problem ``i`` of the split                  |
    +--------------------+---------------------------------------------------------------+

    Keyword arguments (``gymnasium.make("metarl/PlantedSubseq-v0", **kwargs)``):

    +-----------------------+-------------+--------------------------------------------------+
    | kwarg                 | default     | meaning                                          |
    +=======================+=============+==================================================+
    | ``input_length``      | 6           | digits in each problem                           |
    | ``gold_length``       | 3           | digits of the gold subsequence                   |
    | ``chunk_length``      | 4           | digits per chunk in expert traces (>= gold)      |
    | ``family_seed``       | 0           | picks the hidden rule (a problem family)         |
    | ``test_fraction``     | 0.2         | share of digit strings hashed into ``test``      |
    | ``num_test_problems`` | 256         | size of the test split (train is unbounded)      |
    | ``split``             | ``"train"`` | ``"train"`` or ``"test"``; disjoint by hash      |
    | ``max_episodes``      | 3           | episodes before an answer is forced              |
    | ``answer_marker``     | "Answer:"   | text that commits a final answer                 |
    | ``forced_answer_text``| "Answer:"   | observation that turns the policy into the       |
    |                       |             | meta-prover                                      |
    | ``episode_delimiter`` | ``"\\n"``     | ends the prompt and each episode                 |
    | ``feedback``          | False       | verdict on each uncommitted episode              |
    | ``feedback_detail``   | "verdict"   | what the feedback says: ``verdict``              |
    |                       |             | (``[correct]``/``[wrong]``) or ``digits`` (the   |
    |                       |             | episode's first gold_length digits with each     |
    |                       |             | wrong one as ``_``: ``[wrong: 6_5]``)            |
    | ``retry_wrong_answers``| False      | a wrong committed answer ends the trial only at  |
    |                       |             | the last episode (envs.base)                     |
    | ``expert_heterogeneity``| None      | None: the expert traces below. h in [0, 1]: the  |
    |                       |             | failed chunks of verdict traces come from a      |
    |                       |             | mixture of progress experts, one drawn per trace:|
    |                       |             | with probability h an extreme one (slow or fast, |
    |                       |             | equal odds), else the medium one. Failed chunk j |
    |                       |             | holds the gold's first k_j = min(L-1, k_0 + j)   |
    |                       |             | digits (L = gold_length); k_0 = 0 (slow), L-1    |
    |                       |             | (fast), (L-1)//2 or L//2 with equal odds         |
    |                       |             | (medium; one value for odd L). E[k_0] = (L-1)/2  |
    |                       |             | for every h, Var[k_0] grows with h (not for      |
    |                       |             | L <= 2: there every h gives the same k_0 law).   |
    |                       |             | Not with ``feedback_detail="digits"``            |
    | ``expert_pace``       | "progress"  | what the expert's speed sets: ``progress`` (the  |
    |                       |             | failed chunks' k_0; their number is the caller's |
    |                       |             | n_failed) or ``length`` (also their number:      |
    |                       |             | fast 0, medium m, slow 2m failed chunks,         |
    |                       |             | m = (max_episodes - 1) // 2; n_failed unused).   |
    |                       |             | ``length`` needs expert_heterogeneity set and    |
    |                       |             | max_episodes >= 3                                |
    | ``hidden_digits``     | 0           | the gold's last h digits are drawn per problem,  |
    |                       |             | independent of its input: only the replies can   |
    |                       |             | reveal them. Needs ``feedback=True`` and         |
    |                       |             | ``feedback_detail="digits"``                     |
    | ``max_text_length``   | 100000      | longest episode text accepted                    |
    +-----------------------+-------------+--------------------------------------------------+

    Problem ``index`` of a split comes from ``np.random.default_rng([family_seed,
    split_code, index])``, redrawn until ``split_of(digits, test_fraction)`` names the
    split: train and test digit strings never overlap, and a fixed index always gives
    the same problem.

    Expert traces: ``n_failed`` chunks without the gold, then ``"Answer: <chunk>"`` with
    the gold inside. With ``feedback_detail="verdict"``, ``variety`` is the probability that
    each episode takes its varied form: focused (0) = gold first then ``0`` filler, failed
    chunks the gold with every digit shifted; varied (1) = gold at a random offset among
    random filler, failed chunks uniformly random.

    With ``expert_heterogeneity=h`` (a number; verdict only) the failed chunks instead make
    *partial progress*, at a speed set by an expert drawn per trace (a mixture of experts whose
    spread is the dial, meant to reach the warm-started policy as heterogeneity of J after its
    first episode: bench/heterogeneity_dial.py measures whether it does). A trace with
    ``n_failed >= 1`` first draws two uniforms from ``rng``, u1 then u2 (a trace without failed
    chunks draws nothing more and equals the ``None`` trace): the expert is extreme iff u1 < h,
    then slow (k_0 = 0) if u2 < 1/2 else fast (k_0 = L - 1); otherwise medium, k_0 =
    (L - 1) // 2 if u2 < 1/2 else L // 2 (the same for odd L). With L = gold_length = 3: slow 0,
    medium 1, fast 2. So E[k_0] = (L - 1) / 2 for every h, and Var[k_0] = h ((L - 1) / 2)^2 +
    (1 - h) v_m (v_m = 0 for odd L, 1/4 for even L) grows with h for L >= 3. Failed chunk j
    (0-based) is :meth:`progress_miss` (k_j) with k_j = min(L - 1, k_0 + j): the gold's first
    k_j digits at their positions, each of its other digits shifted ``+1`` mod 10, then ``0``
    filler (another repeated digit where ``0``s would complete the gold): never the gold, as at
    least its last digit is shifted. The failed chunks use no ``variety`` draw; ``variety`` is
    then only the probability that the answer chunk takes its varied form (gold at a random
    offset among random filler, drawn after the expert exactly as for ``None``); focused,
    ``"Answer: <gold>0..."``.

    With ``expert_pace="length"`` the expert's speed also sets *when* it answers: the same two
    uniforms are drawn for every trace (also the fast expert's, which has no failed chunk), and the
    trace has :meth:`paced_failures` failed chunks (fast 0, medium m, slow 2m, m = (max_episodes - 1)
    // 2) whatever ``n_failed`` the caller passed. So the mean number of failed chunks is m at every
    h and its variance is h m^2: the mixture's traces differ in length as well as in progress (the
    "different lengths" of a heterogeneous base in Setlur et al. 2025), and at h = 0 every trace has
    m failed chunks before its answer, so no first episode of the base commits.

    With ``retry_wrong_answers`` each failed chunk (either detail, any expert) is committed
    (``"Answer: <chunk>"``): an attempt the environment grades and replies to, after which the
    next attempt follows, as a policy that retries must do.

    With ``feedback_detail="digits"`` the expert instead *searches by reply*: its failed chunks
    are what an expert that does not know the gold writes, reacting only to the replies
    (:meth:`feedback_text`) to its earlier chunks. Chunk 0 starts with ``gold_length`` digits
    drawn uniformly from ``rng``. Chunk j + 1 keeps at its position every digit an earlier reply
    confirmed, and at every other position writes a digit no earlier reply rejected there. The
    correct chunk is the gold followed by filler: it keeps the confirmed digits too (it agrees
    with every reply), the expert finding the rest on its last attempt. The gold always comes
    first, since a reply grades the first ``gold_length`` digits position by position. Each
    episode takes its varied form with probability ``variety``, which sets only how the open
    positions are filled and what the filler is: focused (0) = each open position of chunk
    j + 1 takes the next digit after the one chunk j tried there (``+1`` mod 10, skipping digits
    rejected there), "0" filler; varied (1) = each open position takes a digit drawn uniformly
    from those not rejected there, random filler. Chunk 0's guess is drawn uniformly in both
    forms. The gold enters a failed chunk only to be avoided: a guess that would be the gold is
    drawn again (a focused one: drawn as a varied one), filler never completes it (as above: "0"
    or, where "0"s would complete the gold, another repeated digit; random filler is redrawn).
    An ``n_failed`` the replies cannot allow raises ``ValueError`` (possible only from 10 on: nine
    replies may reject nine digits at a position and so pin the gold down).

    With ``hidden_digits=h`` (> 0) the gold's first ``gold_length - h`` digits follow the rule and its
    last ``h`` are drawn uniformly per problem, from a seed of their own
    (``[family_seed, split code, index, 4]``), independent of the input: no policy can write them
    without the replies, so a trial's success with k episodes is bounded by k / 10 (h = 1; a
    search that never retries a rejected digit reaches it) and one-episode trials by 1/10 each.
    This is the setting where in-context adaptation is needed, not just possible. The search
    expert then knows the rule: its chunk 0 already holds the rule's digits (they follow from the
    input, as if a reply had confirmed them), and it searches by reply only at the hidden
    positions. The problem id carries the split's index (``planted:<digits>/<index>``), since two
    problems with the same input digits differ in their hidden ones.
    """

    def __init__(
        self,
        *,
        input_length: int = 6,
        gold_length: int = 3,
        chunk_length: int = 4,
        family_seed: int = 0,
        test_fraction: float = 0.2,
        num_test_problems: int = 256,
        feedback_detail: str = "verdict",
        expert_heterogeneity: float | None = None,
        expert_pace: str = "progress",
        hidden_digits: int = 0,
        **base_kwargs,
    ):
        # split, max_episodes, answer_marker, ... : EpisodicTextEnv's keywords, whose
        # explicit signature rejects an unknown option by name.
        super().__init__(**base_kwargs)
        name = type(self).__name__
        if input_length < 1 or gold_length < 1:
            raise ValueError(f"{name}: input_length and gold_length must be >= 1, got {input_length}, {gold_length}")
        if chunk_length < gold_length:
            raise ValueError(f"{name}: chunk_length ({chunk_length}) must be >= gold_length ({gold_length})")
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"{name}: test_fraction must be in (0, 1), got {test_fraction}")
        if feedback_detail not in FEEDBACK_DETAILS:
            raise ValueError(f"{name}: feedback_detail={feedback_detail!r}; expected one of {list(FEEDBACK_DETAILS)}")
        if num_test_problems < 1:
            raise ValueError(f"{name}: num_test_problems must be >= 1, got {num_test_problems}")
        if expert_heterogeneity is not None:
            if isinstance(expert_heterogeneity, bool) or not isinstance(
                expert_heterogeneity, (int, float, np.integer, np.floating)
            ):
                raise ValueError(f"{name}: expert_heterogeneity must be None or a number in [0, 1], got {expert_heterogeneity!r}")
            if not 0.0 <= expert_heterogeneity <= 1.0:  # also rejects NaN
                raise ValueError(f"{name}: expert_heterogeneity must be in [0, 1], got {expert_heterogeneity}")
            if feedback_detail == "digits":
                raise ValueError(
                    f"{name}: expert_heterogeneity={expert_heterogeneity} sets the progress experts of the verdict "
                    "traces; feedback_detail='digits' has its own search-by-reply expert: use one option or the other "
                    "(expert_heterogeneity=None with feedback_detail='digits')"
                )
        if expert_pace not in EXPERT_PACES:
            raise ValueError(f"{name}: expert_pace={expert_pace!r}; expected one of {list(EXPERT_PACES)}")
        if expert_pace == "length":
            if expert_heterogeneity is None:
                raise ValueError(
                    f"{name}: expert_pace='length' paces the progress experts of expert_heterogeneity, which is None: "
                    "set expert_heterogeneity to a level in [0, 1]"
                )
            if (self.max_episodes - 1) // 2 < 1:
                raise ValueError(
                    f"{name}: expert_pace='length' needs max_episodes >= 3 (the slow expert answers after "
                    f"2 * ((max_episodes - 1) // 2) failed chunks, the medium one after half as many), got {self.max_episodes}"
                )
        if isinstance(hidden_digits, bool) or not isinstance(hidden_digits, (int, np.integer)):
            raise ValueError(f"{name}: hidden_digits must be an integer in [0, gold_length], got {hidden_digits!r}")
        if not 0 <= hidden_digits <= gold_length:
            raise ValueError(f"{name}: hidden_digits must be in [0, gold_length={gold_length}], got {hidden_digits}")
        if hidden_digits and not (self.feedback and feedback_detail == "digits"):
            raise ValueError(
                f"{name}: hidden_digits={hidden_digits} makes gold digits that only the replies reveal; it needs "
                f"feedback=True and feedback_detail='digits' (got feedback={self.feedback}, "
                f"feedback_detail={feedback_detail!r})"
            )
        self.hidden_digits = int(hidden_digits)
        self.input_length = int(input_length)
        self.gold_length = int(gold_length)
        self.chunk_length = int(chunk_length)
        self.family_seed = int(family_seed)
        self.test_fraction = float(test_fraction)
        self.num_test_problems = int(num_test_problems)
        self.feedback_detail = feedback_detail
        self.expert_heterogeneity = None if expert_heterogeneity is None else float(expert_heterogeneity)
        self.expert_pace = expert_pace

    @property
    def num_problems(self) -> int | None:
        return None if self.split == "train" else self.num_test_problems

    def _problem(self, index: int) -> Problem:
        digits, gold = _planted_problem(
            self.family_seed, self.input_length, self.gold_length, self.split, self.test_fraction, index
        )
        problem_id = f"planted:{digits}"
        if self.hidden_digits:
            gold = gold[: self.gold_length - self.hidden_digits] + _hidden_digits(
                self.family_seed, self.split, index, self.hidden_digits
            )
            problem_id += f"/{index}"
        return Problem(
            problem_id=problem_id,
            prompt=digits + self.episode_delimiter,
            reference=gold,
            data={"digits": digits},
        )

    # ------------------------------------------------------------------ grading
    def score(self, answer_text: str) -> float:
        """1.0 iff the gold digits appear contiguously in the answer (linear time, any string)."""
        return float(isinstance(answer_text, str) and self.reference_answer in answer_text)

    def score_episode(self, episode_text: str) -> float:
        return self.score(episode_text)

    def feedback_text(self, episode_text: str) -> str:
        """``[correct]``/``[wrong]``; with ``feedback_detail="digits"`` a wrong episode's reply shows
        which of its first ``gold_length`` digits (after the answer marker, if it commits) are the
        gold's at that position: ``[wrong: 6_5]``, ``_`` for a wrong or missing digit."""
        if self.feedback_detail == "verdict" or self.score_episode(episode_text) >= 1.0:
            return super().feedback_text(episode_text)
        return f"[wrong: {self._shown_digits(episode_text)}]" + self.episode_delimiter

    def _shown_digits(self, episode_text: str) -> str:
        """What a ``digits`` reply shows of an episode (``"6_5"`` in ``[wrong: 6_5]``): for each
        gold position, the gold's digit where the episode's digit there (counted after the answer
        marker, if it commits) equals it, else ``_``. The search expert reads its replies here."""
        pos = episode_text.rfind(self.answer_marker)
        digits = [c for c in (episode_text[pos + len(self.answer_marker) :] if pos >= 0 else episode_text) if c.isdigit()]
        gold = self.reference_answer
        return "".join(g if i < len(digits) and digits[i] == g else "_" for i, g in enumerate(gold))

    def answer_target(self) -> tuple[str, bool]:
        """The gold right after the forced-answer text; anything may follow it (the
        trial succeeds once the stream holds the gold), so no stop is required."""
        return " " + self.reference_answer, False

    def outcome(self, episodes: list[str], answer: str | None) -> float:
        """1.0 iff an earlier episode or the final answer contains the gold: the stream holds it."""
        texts = episodes + ([answer] if answer is not None else [])
        return float(any(self.score(t) >= 1.0 for t in texts))

    # ------------------------------------------------------------ expert traces
    def expert_trace(self, rng: np.random.Generator, n_failed: int, variety: float) -> list[str]:
        if not 0 <= n_failed < self.max_episodes:
            raise ValueError(f"expert_trace: n_failed must be in [0, max_episodes={self.max_episodes}), got {n_failed}")
        if not 0.0 <= variety <= 1.0:
            raise ValueError(f"expert_trace: variety must be in [0, 1], got {variety}")
        if self.feedback_detail == "digits":
            return self._search_trace(rng, n_failed, variety)
        gold = self.reference_answer
        fill = self.chunk_length - self.gold_length
        episodes = []
        if self.expert_heterogeneity is not None:  # progress experts
            if self.expert_pace == "length":  # the expert's speed also sets how many failed chunks come first
                expert, k0 = self.progress_expert(rng)
                n_failed = self.paced_failures(expert)
            else:  # nothing drawn without failed chunks
                k0 = self.progress_expert(rng)[1] if n_failed else 0
            episodes = [self.progress_miss(min(self.gold_length - 1, k0 + j)) for j in range(n_failed)]
        else:
            for j in range(n_failed):
                if rng.random() < variety:
                    episodes.append(self._random_miss(rng))
                else:
                    episodes.append(self._canonical_miss(j))
        if self.retry_wrong_answers:  # each failed chunk is a committed attempt the reply then grades
            episodes = [f"{self.answer_marker} {e}" for e in episodes]
        if rng.random() < variety:
            filler = "".join(str(int(d)) for d in rng.integers(0, 10, size=fill))
            at = int(rng.integers(0, fill + 1))
            chunk = filler[:at] + gold + filler[at:]
        else:
            chunk = gold + "0" * fill
        episodes.append(f"{self.answer_marker} {chunk}")
        return episodes

    def progress_expert(self, rng: np.random.Generator) -> tuple[str, int]:
        """The progress expert of one trace (``expert_heterogeneity`` set), from two uniforms of
        ``rng`` (the class docstring's rule): (its name in :data:`PROGRESS_EXPERTS`, its k_0)."""
        if self.expert_heterogeneity is None:
            raise ValueError("progress_expert: expert_heterogeneity is None (no progress experts)")
        extreme, upper = rng.random() < self.expert_heterogeneity, rng.random() >= 0.5
        last = self.gold_length - 1
        if extreme:
            return ("fast", last) if upper else ("slow", 0)
        return "medium", (self.gold_length // 2 if upper else last // 2)

    def paced_failures(self, expert: str) -> int:
        """``expert_pace="length"``: the failed chunks before the answer of an expert of
        :data:`PROGRESS_EXPERTS`: fast 0, medium m, slow 2m, with m = (max_episodes - 1) // 2."""
        m = (self.max_episodes - 1) // 2
        return {"fast": 0, "medium": m, "slow": 2 * m}[expert]

    def progress_miss(self, right: int) -> str:
        """A failed chunk of a progress expert: the gold's first ``right`` (< gold_length) digits at
        their positions, each of its other digits shifted ``+1`` mod 10, then filler ``0``s (another
        repeated digit where ``0``s would complete the gold). Never contains the gold: the first
        gold_length digits differ from it, and a gold at a later offset would end inside the filler,
        which rules out at most one filler digit (the gold's last)."""
        gold = self.reference_answer
        if not 0 <= right < len(gold):
            raise ValueError(f"progress_miss: right must be in [0, gold_length={len(gold)}), got {right}")
        head = gold[:right] + "".join(str((int(g) + 1) % 10) for g in gold[right:])
        for digit in "0123456789":
            chunk = head + digit * (self.chunk_length - len(gold))
            if gold not in chunk:
                return chunk
        raise AssertionError("unreachable: a shifted digit with some repeated filler avoids the gold")

    def _canonical_miss(self, j: int) -> str:
        gold = self.reference_answer
        fill = self.chunk_length - self.gold_length
        # Filler "0" first (the original recipe); other filler digits only where "0"s would
        # complete the gold (e.g. gold "0").
        for filler in "0123456789":
            for shift in range(j + 1, j + 11):
                chunk = "".join(str((int(g) + shift) % 10) for g in gold) + filler * fill
                if gold not in chunk:
                    return chunk
        raise AssertionError("unreachable: some shift of every digit with some filler avoids the gold")

    def _search_trace(self, rng: np.random.Generator, n_failed: int, variety: float) -> list[str]:
        """The search-by-reply expert of ``feedback_detail="digits"`` (the class docstring says what
        it writes). Its failed attempts use the gold only to avoid writing it; every other choice
        follows from ``rng`` and the replies (:meth:`_shown_digits`, what :meth:`feedback_text` shows)."""
        confirmed: list[str | None] = [None] * self.gold_length  # the digit a reply confirmed at each position
        known = self.gold_length - self.hidden_digits if self.hidden_digits else 0
        confirmed[:known] = self.reference_answer[:known]  # hidden_digits: the rule's digits are known from the input
        rejected: list[set[str]] = [set() for _ in range(self.gold_length)]  # digits replies rejected there
        last: str | None = None  # the previous attempt's first gold_length digits
        episodes = []
        for j in range(n_failed):
            varied = rng.random() < variety
            chunk = self._search_guess(rng, confirmed, rejected, last, varied, j)
            episode = f"{self.answer_marker} {chunk}" if self.retry_wrong_answers else chunk
            for i, (digit, shown) in enumerate(zip(chunk, self._shown_digits(episode))):
                if shown == "_":
                    rejected[i].add(digit)
                else:
                    confirmed[i] = shown
            last = chunk[: self.gold_length]
            episodes.append(episode)
        fill = self.chunk_length - self.gold_length
        if rng.random() < variety:
            filler = "".join(str(int(d)) for d in rng.integers(0, 10, size=fill))
        else:
            filler = "0" * fill
        episodes.append(f"{self.answer_marker} {self.reference_answer}{filler}")  # gold first: agrees with every reply
        return episodes

    def _search_guess(
        self,
        rng: np.random.Generator,
        confirmed: list[str | None],
        rejected: list[set[str]],
        last: str | None,
        varied: bool,
        j: int,
    ) -> str:
        """A failed attempt's chunk: confirmed digits kept; at each other position a digit not
        rejected there, uniform (the first attempt, or ``varied``) or the next one after the digit
        ``last`` tried there (focused); then filler. Never contains the gold."""
        gold = self.reference_answer
        allowed = [[d for d in "0123456789" if d not in rejected[i]] for i in range(self.gold_length)]
        if all(c is not None or len(a) == 1 for c, a in zip(confirmed, allowed)):
            # Every open position has one digit left, the gold's (a reply never rejects it): the
            # replies so far pin the gold down and no failed attempt is left to make.
            raise ValueError(
                f"expert_trace: after {j} replies the search has found the gold; n_failed={j + 1} or more "
                "failed attempts cannot be searched by reply on this problem"
            )
        sweep = not varied and last is not None
        for _ in range(_MAX_REDRAWS):
            digits = []
            for i, c in enumerate(confirmed):
                if c is not None:
                    digits.append(c)
                elif sweep:  # the allowed set holds the gold's digit, so the sweep always finds one
                    digits.append(next(d for k in range(1, 11) if (d := str((int(last[i]) + k) % 10)) in allowed[i]))
                else:
                    digits.append(allowed[i][int(rng.integers(0, len(allowed[i])))])
            guess = "".join(digits)
            if guess != gold:
                return guess + self._search_filler(rng, guess, varied)
            sweep = False  # the sweep would write the gold: draw instead (redrawn until it misses)
        raise AssertionError("unreachable: another allowed digit exists at some open position")

    def _search_filler(self, rng: np.random.Generator, guess: str, varied: bool) -> str:
        """Filler after a failed guess that never completes the gold: "0"s (another repeated digit
        where "0"s would complete it), or, ``varied``, random digits redrawn until they do not."""
        gold, fill = self.reference_answer, self.chunk_length - self.gold_length
        if varied:
            for _ in range(_MAX_REDRAWS):
                filler = "".join(str(int(d)) for d in rng.integers(0, 10, size=fill))
                if gold not in guess + filler:
                    return filler
        for digit in "0123456789":  # at most one digit (the gold's last) can complete it
            if gold not in guess + digit * fill:
                return digit * fill
        raise AssertionError("unreachable: a guess that is not the gold with some repeated filler avoids it")

    def _random_miss(self, rng: np.random.Generator) -> str:
        while True:
            chunk = "".join(str(int(d)) for d in rng.integers(0, 10, size=self.chunk_length))
            if self.reference_answer not in chunk:
                return chunk
