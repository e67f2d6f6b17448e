"""The ``hf_generate`` engine: ``model.generate`` once per episode on the whole history, the
baseline a transformers user would write. Every logits processor and warper the model's
``generation_config`` would apply is passed a neutral value, so it samples from the
distribution the trainer scores (a processor it cannot neutralise is an error).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import GenerationConfig

from metarl_llm.core.batch import pad_rows
from metarl_llm.core.trial import StreamCodec
from metarl_llm.models import head_values
from metarl_llm.rollout.base import Engine, episode_limit, finish_round, register_engine, start_trials
from metarl_llm.rollout.reencode import _episode
from metarl_llm.rollout.sampling import Sampled


@register_engine("hf_generate")
class HFGenerateEngine(Engine):
    """``model.generate`` once per episode on the whole re-encoded history (the
    transformers baseline). Sampling: ``do_sample=True`` from softmax of the raw logits, every
    logits processor and warper the model's own ``generation_config`` may set (repetition
    penalty, n-gram blocking, min length, suppressed tokens, top-k/p, ...) switched off
    (:data:`_NEUTRAL_GENERATION`), and an error if ``generate`` still changed the scores it drew
    from; log-probs from the raw generation logits (values, with ``value_head``: from the
    generation's last-layer hidden states). Rows with different token limits are
    generated in separate calls (one per distinct limit, of at most ``max_rows`` trials each)."""

    supports_values = True

    @torch.no_grad()
    def run_trials(
        self,
        model,
        codec,
        envs,
        resets,
        groups,
        budget,
        generator=None,
        keep_cache=False,
        greedy=False,
        keys=None,
        value_head=None,
    ):
        trials = start_trials(codec, envs, resets, groups, budget)
        live = list(range(len(trials)))
        forced = [False] * len(trials)
        for _round in range(budget.max_episodes + 2):
            if not live:
                return trials
            limits = {i: episode_limit(trials[i], forced[i], budget, codec) for i in live}
            results = {}
            for lim in sorted(set(limits.values())):
                same = [i for i in live if limits[i] == lim]
                for s in range(0, len(same), self.max_rows):  # at most max_rows trials per generate call
                    rows = same[s : s + self.max_rows]
                    out = _generate(model, [trials[i].ids for i in rows], lim, codec, greedy, value_head)
                    for row, i in enumerate(rows):
                        results[i] = _episode(out, row)
            live = finish_round(trials, envs, codec, results, live, forced, budget)
        if live:
            raise RuntimeError(f"{len(live)} trial(s) did not terminate within max_episodes+2 rounds")
        return trials


# Every GenerationConfig entry with which ``model.generate`` changes the logits before it draws a
# token (a logits processor or warper), or decodes otherwise than one token per step from them
# (beams, extra sequences, constrained, contrastive, assisted or DoLa decoding, stop strings), at
# its "off" value. ``generate`` merges the model's own ``generation_config`` (a checkpoint's
# generation_config.json; Qwen2.5-Instruct ships repetition_penalty 1.05-1.1) into every call: it
# fills what the call leaves unset, and a ``generation_config=`` argument does not stop it (its
# defaults / None entries are replaced by the model's). Only keyword arguments win: they are applied
# last, None included (``GenerationConfig.update(**kwargs)`` in ``_prepare_generation_config``,
# transformers 4.56 and 5.x alike). Entries a transformers version lacks are left out.
_WARPERS = ("temperature", "top_k", "top_p", "min_p", "top_h", "typical_p", "epsilon_cutoff", "eta_cutoff")
_NEUTRAL_GENERATION = {
    # warpers (applied when sampling only)
    "temperature": 1.0,
    "top_k": 0,
    "top_p": 1.0,
    "min_p": None,
    "top_h": None,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    # processors
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "sequence_bias": None,
    "min_length": 0,
    "min_new_tokens": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "exponential_decay_length_penalty": None,
    "remove_invalid_values": False,
    "renormalize_logits": False,
    "guidance_scale": None,
    "watermarking_config": None,
    "token_healing": False,
    # decoding mode and stopping
    "num_beams": 1,
    "num_beam_groups": 1,
    "num_return_sequences": 1,
    "penalty_alpha": None,
    "dola_layers": None,
    "constraints": None,
    "force_words_ids": None,
    "prompt_lookup_num_tokens": None,
    "assistant_early_exit": None,
    "use_mtp": False,
    "stop_strings": None,
    "max_time": None,
}


def _neutral_generation_kwargs(greedy: bool = False) -> dict:
    """:data:`_NEUTRAL_GENERATION` less the entries this transformers' GenerationConfig does not have
    (``generate`` would pass those to the model's forward) and, greedy, less the warpers (unused
    without sampling; transformers warns about them)."""

    known = GenerationConfig()
    return {k: v for k, v in _NEUTRAL_GENERATION.items() if hasattr(known, k) and not (greedy and k in _WARPERS)}


def _raw_logprobs_checked(
    scores, logits, new: torch.Tensor, valid: torch.Tensor, atol: float = 1e-4
) -> tuple[torch.Tensor, int, float]:
    """The raw logits' log-probs of the generated tokens ``new`` [N, L], and (number of valid positions,
    largest |log p| difference) where ``generate``'s processed scores (what it drew from) give another
    log-softmax than its raw logits. Step by step on the tensors ``generate`` returned: no forward pass,
    no [N, L, V] copy, one device sync."""
    logprobs = torch.zeros(new.shape, dtype=torch.float32, device=new.device)
    worst = torch.zeros(new.shape[0], device=new.device)
    count = torch.zeros((), dtype=torch.long, device=new.device)
    for t in range(min(len(logits), new.shape[1])):
        raw, proc = F.log_softmax(logits[t].float(), -1), F.log_softmax(scores[t].float(), -1)
        logprobs[:, t] = raw.gather(-1, new[:, t, None]).squeeze(-1)
        diff = torch.where(proc == raw, 0.0, (proc - raw).abs()).nan_to_num(nan=float("inf")).amax(-1)  # -inf == -inf: 0
        diff = torch.where(valid[:, t], diff, 0.0)  # a stopped row's later positions do not count
        worst = torch.maximum(worst, diff)
        count += (diff > atol).sum()
    return logprobs, int(count), float(worst.max()) if worst.numel() else 0.0


def _processor_error(model, positions: int, worst: float) -> ValueError:
    config = getattr(model, "generation_config", None)
    set_here = {
        k: getattr(config, k)
        for k, off in _NEUTRAL_GENERATION.items()
        if getattr(config, k, None) is not None and getattr(config, k) != off
    }
    cause = (
        f"the model's generation_config sets {', '.join(f'{k}={v!r}' for k, v in set_here.items())} and generate "
        f"still applied it as a logits processor"
        if set_here
        else "a logits processor from outside the model's generation_config (a subclass's or remote code's "
        "generate / _get_logits_processor, or a processor this transformers version adds)"
    )
    return ValueError(
        f"rollout.engine=hf_generate: model.generate drew {positions} token(s) from processed scores that differ from "
        f"the raw logits (largest |log p difference| {worst:.3g}), so the sampled tokens do not follow the policy whose "
        f"log-probs are stored and trained on. Likely cause: {cause}. Fix: set those entries of model.generation_config "
        f"to their neutral values (or replace it: model.generation_config = transformers.GenerationConfig(eos_token_id=..., "
        f"pad_token_id=...)), or use rollout.engine=cached."
    )


def _generate(
    model,
    contexts: list[list[int]],
    max_new_tokens: int,
    codec: StreamCodec,
    greedy: bool,
    value_head: torch.nn.Module | None = None,
):

    device = next(model.parameters()).device
    n, width = len(contexts), max(len(c) for c in contexts)
    ids, mask = pad_rows(contexts, codec.pad_id, width=width, left=True)
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=max_new_tokens,
        **{
            **_neutral_generation_kwargs(greedy),
            "do_sample": not greedy,
            "eos_token_id": codec.stop_ids.tolist(),
            "pad_token_id": codec.pad_id,
            "return_dict_in_generate": True,
            "output_logits": True,
            "output_scores": True,
        },
        **({"output_hidden_states": True} if value_head is not None else {}),
    )
    new = out.sequences[:, width:]
    is_stop = torch.isin(new, codec.stop_ids.to(new.device))
    first_stop = torch.where(is_stop.any(1), is_stop.float().argmax(1), torch.full((n,), new.shape[1], device=new.device))
    lengths = torch.clamp(first_stop + 1, max=new.shape[1])
    valid = torch.arange(new.shape[1], device=new.device)[None] < lengths[:, None]
    # log-probs of the raw logits, the policy's; an error unless they are also those generate drew from
    logprobs, positions, worst = _raw_logprobs_checked(out.scores, out.logits, new, valid)
    if positions:
        raise _processor_error(model, positions, worst)
    values = None
    if value_head is not None:  # hidden_states: one tuple of layers per generation step; its last position gave the logits
        hidden = torch.stack([step[-1][:, -1] for step in out.hidden_states[: new.shape[1]]], 1)  # [n, L, H]
        values = (head_values(value_head, hidden) * valid).cpu()
    return Sampled(
        torch.where(valid, new, codec.pad_id).cpu(), (logprobs * valid).cpu(), lengths.cpu(), is_stop.any(1).cpu(), values
    )
