"""``rollout.engine=hf_generate`` samples from exactly the distribution whose log-probs it stores
(issue 15, item 7), whatever the model's own ``generation_config`` says.

``model.generate`` merges the model's saved ``generation_config`` (a checkpoint's
``generation_config.json``: Qwen2.5-Instruct ships ``repetition_penalty`` 1.05-1.1) into every call
and applies its logits processors before it draws, while the engine stores the log-probs of the raw
logits (the policy the trainer scores). Here the tiny model's generation config sets such processors;
then

- the distribution ``generate`` draws from (read at its ``torch.multinomial`` call) is softmax of the
  scoring forward's logits, and each stored log-prob is the log-prob of the drawn token under it;
- the trials (sampled with the same torch seed) and the greedy trials are those of a model whose
  generation config sets nothing, and their stored log-probs are the scoring forward's;
- a processor the engine does not neutralise is an error naming its likely cause, not a silent bias.
"""

import gymnasium as gym
import pytest
import torch
import torch.nn.functional as F
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

import envs  # noqa: F401
import metarl_llm.rollout.hf_generate as engine_mod
from metarl_llm.config import BudgetConfig, TinyModelConfig
from metarl_llm.core.trial import StreamCodec
from metarl_llm.models import build_char_tokenizer, build_tiny_model
from metarl_llm.rollout.engine import run_trials
from metarl_llm.rollout.hf_generate import HFGenerateEngine, _generate

TINY = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
BUDGET = BudgetConfig(max_episodes=4, max_episode_tokens=9, max_total_tokens=30, answer_max_tokens=6)
PLANTED = "metarl/PlantedSubseq-v0"

# Generation configs a checkpoint may ship: each one applies processors (or another decoding mode).
CONFIGS = {
    "repetition_penalty": {"repetition_penalty": 1.3},
    "no_repeat_ngram_size": {"no_repeat_ngram_size": 2},
    "min_new_tokens": {"min_new_tokens": 6, "min_length": 40},
    "suppress_tokens": {"suppress_tokens": list(range(5, 60)), "begin_suppress_tokens": list(range(60, 90))},
    "warpers": {
        "do_sample": True,
        "temperature": 0.6,
        "top_k": 4,
        "top_p": 0.5,
        "min_p": 0.2,
        "typical_p": 0.5,
        "epsilon_cutoff": 0.05,
        "eta_cutoff": 0.05,
    },
    "many": {
        "repetition_penalty": 1.1,
        "sequence_bias": {(40,): -5.0, (41,): 5.0},
        "bad_words_ids": [[42], [43]],
        "exponential_decay_length_penalty": (1, 2.0),
        "forced_eos_token_id": 2,
        "renormalize_logits": True,
        "remove_invalid_values": True,
        "num_beams": 2,
        "num_return_sequences": 2,
        "guidance_scale": 1.5,
    },
}


def tiny_model(**generation):
    """The project's tiny Llama with peaked logits (embeddings x10, tied head: max prob ~0.6), so that a processor changes
    which tokens are drawn; ``generation`` is set on its ``generation_config`` (as a checkpoint's would be)."""
    tok = build_char_tokenizer()
    model = build_tiny_model(TINY, len(tok), tok.pad_token_id, 0).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(10.0)
    for k, v in generation.items():
        setattr(model.generation_config, k, v)
    return model


@pytest.fixture(scope="module")
def codec():
    return StreamCodec(build_char_tokenizer(), "\n", "Answer:")


@pytest.fixture(scope="module")
def clean():
    return tiny_model()


def play(model, codec, greedy=False, n=8, seed=5):
    torch.manual_seed(seed)  # hf_generate samples from the global generator
    env_list = [gym.make(PLANTED, max_episodes=BUDGET.max_episodes) for _ in range(n)]
    resets, groups = [{"seed": 100 + i // 2} for i in range(n)], [i // 2 for i in range(n)]
    if greedy:
        return HFGenerateEngine().run_trials(model, codec, env_list, resets, groups, BUDGET, greedy=True)
    return run_trials(model, codec, env_list, resets, groups, BUDGET, torch.Generator().manual_seed(0), engine="hf_generate")


@torch.no_grad()
def scored(model, t):
    """log pi of every token of trial ``t`` from one plain forward over its stream, and the argmax token."""
    ids = torch.tensor([t.ids])
    lsm = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    return lsm.gather(-1, ids[0, 1:, None]).squeeze(-1), lsm.argmax(-1)


def check_trials(model, trials, reference, greedy=False):
    """Same streams as ``reference`` and the stored log-probs are the scoring forward's (1e-5)."""
    assert [t.ids for t in trials] == [t.ids for t in reference]
    n_act = 0
    for t in trials:
        lp, top = scored(model, t)
        act = torch.tensor(t.action[1:], dtype=torch.bool)
        n_act += int(act.sum())
        assert float((lp[act] - torch.tensor(t.sample_logprobs[1:])[act]).abs().max()) < 1e-5
        if greedy:
            assert torch.equal(top[act], torch.tensor(t.ids[1:])[act])
    assert n_act > 60


@pytest.fixture(scope="module")
def reference(clean, codec):
    return {greedy: play(clean, codec, greedy) for greedy in (False, True)}


def test_the_peaked_model_is_not_degenerate(reference):
    # Several tokens per step have real mass: the sampled trials differ from the greedy ones.
    assert [t.ids for t in reference[False]] != [t.ids for t in reference[True]]


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("greedy", [False, True], ids=["sample", "greedy"])
def test_trials_ignore_the_models_generation_config(codec, reference, one_thread, name, greedy):
    model = tiny_model(**CONFIGS[name])
    check_trials(model, play(model, codec, greedy), reference[greedy], greedy)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_generate_draws_from_the_scored_distribution(codec, one_thread, monkeypatch, name):
    """The probabilities ``generate`` hands to ``torch.multinomial`` are softmax of the raw logits of a
    scoring forward at that position, and the stored log-prob is that of the drawn token."""
    model = tiny_model(**CONFIGS[name])
    tok = codec.tokenizer
    contexts = [tok.encode(s, add_special_tokens=False) for s in ("abcabcabc", "Find x.", "the the the the", "q")]
    draws = []
    multinomial = torch.multinomial

    def recording(probs, *args, **kwargs):
        draws.append(probs.detach().clone())
        return multinomial(probs, *args, **kwargs)

    monkeypatch.setattr(torch, "multinomial", recording)
    torch.manual_seed(3)
    out = _generate(model, contexts, 12, codec, greedy=False)
    monkeypatch.undo()
    assert len(draws) >= int(out.lengths.max()) and all(d.shape[0] == len(contexts) for d in draws)
    checked = 0
    with torch.no_grad():
        for r, c in enumerate(contexts):
            for t in range(int(out.lengths[r])):
                stream = torch.tensor([c + out.tokens[r, :t].tolist()])
                lsm = F.log_softmax(model(input_ids=stream).logits[0, -1].float(), -1)
                assert float((draws[t][r] - lsm.exp()).abs().max()) < 1e-6, (r, t)
                assert abs(float(out.logprobs[r, t]) - float(lsm[out.tokens[r, t]])) < 1e-5
                checked += 1
    assert checked >= 20


@pytest.mark.parametrize("greedy", [False, True], ids=["sample", "greedy"])
def test_a_processor_generate_still_applies_is_an_error(codec, one_thread, monkeypatch, greedy):
    """The runtime check (processed scores against raw logits): with the engine's neutral arguments
    withheld, the model's repetition_penalty is named; a processor from elsewhere is caught too."""
    contexts = [codec.encode("abcabcabc"), codec.encode("the the")]
    model = tiny_model(repetition_penalty=1.3)
    monkeypatch.setattr(engine_mod, "_neutral_generation_kwargs", lambda *a: {})  # neutral arguments withheld
    with pytest.raises(ValueError, match=r"repetition_penalty=1\.3"):
        _generate(model, contexts, 8, codec, greedy)
    monkeypatch.undo()
    _generate(model, contexts, 8, codec, greedy)  # neutralised: no error

    model = tiny_model()
    original = model._get_logits_processor

    def with_penalty(*args, **kwargs):  # e.g. remote code or a subclass adding its own processor
        procs = original(*args, **kwargs)
        procs.append(RepetitionPenaltyLogitsProcessor(1.3))
        return procs

    monkeypatch.setattr(model, "_get_logits_processor", with_penalty)
    with pytest.raises(ValueError, match="logits processor"):
        _generate(model, contexts, 8, codec, greedy)
