"""metarl-llm environments: text-in, text-out Gymnasium envs, one trial per Gymnasium episode.

Importing this package registers every environment with Gymnasium (idempotently)::

    import gymnasium, envs
    env = gymnasium.make(envs.ENV_IDS["planted_subseq"], split="test")

The contract they share is :mod:`envs.base`. This package never imports ``metarl_llm``.
"""

from __future__ import annotations

import gymnasium

from envs.base import EpisodicTextEnv, Problem, UnicodeText, split_of

ENV_IDS = {
    "arc": "metarl/Arc-v0",
    "inverse": "metarl/Inverse-v0",
    "math": "metarl/Math-v0",
    "planted_subseq": "metarl/PlantedSubseq-v0",
    "reasoning_gym": "metarl/ReasoningGym-v0",
}

_ENTRY_POINTS = {
    "arc": "envs.arc:ArcEnv",
    "inverse": "envs.inverse:InverseEnv",
    "math": "envs.math_env:MathEnv",
    "planted_subseq": "envs.planted_subseq:PlantedSubseqEnv",
    "reasoning_gym": "envs.reasoning_gym_env:ReasoningGymEnv",
}

for _name, _env_id in ENV_IDS.items():
    if _env_id not in gymnasium.registry:
        # No max_episode_steps: a trial ends itself (answer committed or forced).
        gymnasium.register(id=_env_id, entry_point=_ENTRY_POINTS[_name])

__all__ = ["ENV_IDS", "EpisodicTextEnv", "Problem", "UnicodeText", "split_of"]
