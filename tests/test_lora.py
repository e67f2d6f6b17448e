"""LoRA policies (model.lora): the reference is the base model with the adapter disabled
(no copy), only LoRA and critic parameters train, checkpoints reload through load_policy,
gradient checkpointing, config validation, and an end-to-end run."""

import copy
import json

import pytest
import torch
from peft import PeftModel

from metarl_llm.config import ModelConfig, PolicyLoraConfig, TinyModelConfig
from metarl_llm.core.batch import RolloutBatch
from metarl_llm.models import (
    AdapterDisabled,
    add_lora,
    build_actor_critic,
    frozen_reference,
    load_policy,
    merged_policy,
    token_logprobs,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # raised inside peft

TINY = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _model_cfg(r: int = 4, **kw) -> ModelConfig:
    return ModelConfig(tiny=TINY, lora=PolicyLoraConfig(r=r, alpha=8.0), **kw)


def _streams(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask, action_mask [3, 16]; rows of 16, 12 and 9 tokens."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([16, 12, 9])
    pos = torch.arange(16).expand(3, 16)
    am = (pos < lengths[:, None]).long()
    ids = torch.randint(4, 90, (3, 16), generator=g) * am
    return ids, am, ((pos >= 3) & (am > 0)).float()


def _logprobs(model, ids, am) -> torch.Tensor:
    """[B, T] log pi(x_t | x_<t) (0 at t = 0), computed here from the logits."""
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=am, use_cache=False).logits[:, :-1]
    return torch.cat([torch.zeros(ids.shape[0], 1), token_logprobs(logits, ids[:, 1:])], 1)


def _train_step(ac, ids, am, mask, lr: float = 0.05) -> None:
    """One AdamW step on the LoRA (+ value head) parameters: push up the action tokens' log-probs."""
    opt = torch.optim.AdamW(ac.policy_parameters() + ac.critic_parameters(), lr=lr)
    ac.train()
    s = ac.score(ids, am, with_values=True)
    (-(s.logprobs * mask).sum() + (s.values * mask).pow(2).sum()).backward()
    opt.step()
    ac.eval()


def test_reference_is_the_base_model_after_the_adapter_trained(one_thread):
    from metarl_llm.rl.scoring import score_batch

    cfg = _model_cfg()
    policy, _ = load_policy(cfg, 0)
    base = copy.deepcopy(policy).eval()  # the model before LoRA, an independent copy
    ac = build_actor_critic(policy, cfg, seed=0).eval()
    reference = frozen_reference(ac)
    assert isinstance(reference, AdapterDisabled)
    # no second copy: every tensor of the reference is one of the policy's
    policy_ptrs = {p.data_ptr() for p in ac.policy.parameters()}
    assert {p.data_ptr() for p in reference.parameters()} <= policy_ptrs
    ids, am, mask = _streams()
    assert torch.equal(_logprobs(ac.policy, ids, am), _logprobs(base, ids, am))  # B = 0: starts as the base model

    _train_step(ac, ids, am, mask)
    assert float((_logprobs(ac.policy, ids, am) - _logprobs(base, ids, am)).abs().max()) > 1e-2  # the policy moved

    # the trainer's reference log-probs are the base model's, exactly
    zeros = torch.zeros(ids.shape, dtype=torch.float32)
    batch = RolloutBatch(
        ids,
        am,
        mask,
        torch.where(mask > 0, 0, -1),
        zeros,
        zeros,
        zeros,
        zeros,
        zeros,
        zeros,
        torch.zeros(3),
        torch.zeros(3, dtype=torch.long),
    )
    scored = score_batch(ac, reference, batch, use_critic=True)
    assert torch.equal(scored.ref_logprobs, _logprobs(base, ids, am) * mask)
    assert not torch.equal(scored.logprobs, scored.ref_logprobs)
    # ... and so is everything else the bonus may call on it (trunk, LM head, generate)
    with torch.no_grad():
        h_ref = reference.base_model(input_ids=ids, attention_mask=am, use_cache=False).last_hidden_state
        h_base = base.base_model(input_ids=ids, attention_mask=am, use_cache=False).last_hidden_state
        assert torch.equal(h_ref, h_base)
        assert torch.equal(reference.get_output_embeddings()(h_ref), base.get_output_embeddings()(h_base))
        prompt = ids[:1, :5]
        kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(reference.generate(prompt, **kw), base.generate(prompt, **kw))
    # the adapter is enabled again after every reference call
    assert float((_logprobs(ac.policy, ids, am) - _logprobs(base, ids, am)).abs().max()) > 1e-2


def test_lora_init_is_seeded_and_full_fine_tuning_keeps_a_frozen_copy(one_thread):
    a = build_actor_critic(load_policy(_model_cfg(), 0)[0], _model_cfg(), seed=3)
    b = build_actor_critic(load_policy(_model_cfg(), 0)[0], _model_cfg(), seed=3)
    c = build_actor_critic(load_policy(_model_cfg(), 0)[0], ModelConfig(tiny=TINY, lora=PolicyLoraConfig(r=4, seed=4)), seed=3)
    pa, pb, pc = (torch.cat([p.flatten() for p in m.policy_parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)  # model.lora.seed overrides the run's seed

    full = build_actor_critic(load_policy(_model_cfg(r=0), 0)[0], _model_cfg(r=0), seed=0)
    assert full.adapter is None
    ref = frozen_reference(full)
    assert not any(p.requires_grad for p in ref.parameters())
    assert not ({p.data_ptr() for p in ref.parameters()} & {p.data_ptr() for p in full.policy.parameters()})


@pytest.mark.parametrize("critic", ["shared", "separate"])
def test_only_lora_and_critic_parameters_train(one_thread, critic):
    cfg = _model_cfg(r=4, critic=critic)
    ac = build_actor_critic(load_policy(cfg, 0)[0], cfg, seed=0)
    names = {id(p): n for n, p in ac.named_parameters()}
    policy_names = [names[id(p)] for p in ac.policy_parameters()]
    assert policy_names and all(".lora_A." in n or ".lora_B." in n for n in policy_names)
    # r x (in + out) per adapted projection, counted from the base model's layers
    linears = [m for n, m in load_policy(cfg, 0)[0].named_modules() if n.rsplit(".", 1)[-1] in TARGETS]
    assert sum(p.numel() for p in ac.policy_parameters()) == sum(4 * (m.in_features + m.out_features) for m in linears)
    frozen = [n for n, p in ac.policy.named_parameters() if not p.requires_grad]
    assert frozen and not any("lora_" in n for n in frozen)
    critic_names = [names[id(p)] for p in ac.critic_parameters()]
    assert all(p.requires_grad for p in ac.critic_parameters())
    if critic == "shared":
        assert critic_names == ["value_head.weight", "value_head.bias"]
    else:  # its own trunk, fully trained
        assert len(critic_names) > 2 and all(n.startswith(("critic_trunk.", "value_head.")) for n in critic_names)
    # with a shared critic the value loss reaches the LoRA parameters, never the base weights
    ids, am, mask = _streams()
    ac.train()
    ac.value_head.weight.data.normal_()  # zero-initialised: give the trunk a gradient
    (ac.score(ids, am).values * mask).pow(2).sum().backward()
    assert all(p.grad is None for n, p in ac.policy.named_parameters() if "lora_" not in n)
    lora_grads = [p.grad for p in ac.policy_parameters() if p.grad is not None]
    assert bool(lora_grads) == (critic == "shared")


def test_lora_checkpoint_reloads_through_load_policy(one_thread, tmp_path):
    from metarl_llm.models import build_char_tokenizer
    from metarl_llm.runtime.checkpoint import save_checkpoint

    cfg = _model_cfg()
    ac = build_actor_critic(load_policy(cfg, 0)[0], cfg, seed=0)
    ids, am, mask = _streams()
    _train_step(ac, ids, am, mask)
    opt = torch.optim.AdamW(ac.policy_parameters(), lr=1e-3)
    ckpt = save_checkpoint(tmp_path, 1, ac, build_char_tokenizer(), opt)
    assert (tmp_path / "checkpoints" / "latest").read_text() == "iter_000001"
    assert not list((tmp_path / "checkpoints").glob(".tmp_*"))
    with torch.no_grad():
        live = ac.policy(input_ids=ids, attention_mask=am).logits

    reloaded, tok = load_policy(cfg, 0, str(ckpt / "policy"))  # merged weights: a plain model, whatever model.lora says
    assert not any("lora_" in n for n, _ in reloaded.named_parameters())
    assert tok.pad_token_id == build_char_tokenizer().pad_token_id
    with torch.no_grad():
        assert float((reloaded(input_ids=ids, attention_mask=am).logits - live).abs().max()) < 1e-5
    # the adapter alone, on the base model it was trained from
    base, _ = load_policy(cfg, 0)
    with_adapter = PeftModel.from_pretrained(base, ckpt / "adapter")
    with torch.no_grad():
        assert float((with_adapter(input_ids=ids, attention_mask=am).logits - live).abs().max()) < 1e-5
    assert torch.load(ckpt / "trainer_state.pt", weights_only=False)["iteration"] == 1
    # saving merged a copy: the live policy still carries its adapter
    assert ac.adapter is not None and any("lora_" in n for n, _ in ac.policy.named_parameters())
    assert not any("lora_" in n for n, _ in merged_policy(ac).named_parameters())


def test_gradient_checkpointing_on_the_tiny_model_gives_the_same_lora_gradients(one_thread):
    grads = []
    for checkpointing in (False, True):
        cfg = _model_cfg(gradient_checkpointing=checkpointing)
        policy, _ = load_policy(cfg, 0)
        assert policy.model.gradient_checkpointing is checkpointing  # applied to the tiny model too
        ac = build_actor_critic(policy, cfg, seed=0)
        g = torch.Generator().manual_seed(0)
        for p in ac.policy_parameters():  # B != 0, so that every LoRA parameter gets a gradient
            p.data.copy_(0.1 * torch.randn(p.shape, generator=g))
        ids, am, mask = _streams()
        ac.train()
        s = ac.score(ids, am, with_values=True)
        ((s.logprobs * mask).sum() + (s.values * mask).sum()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in ac.policy_parameters()]))
    assert grads[0].norm() > 0
    assert float((grads[1] - grads[0]).norm() / grads[0].norm()) < 1e-6


def test_lora_config_errors(compose_cfg):
    from hydra.errors import ConfigCompositionException

    from metarl_llm.jobs.common import validate

    for bad, match in [
        (dict(r=-1), "model.lora.r"),
        (dict(alpha=0.0), "model.lora.alpha"),
        (dict(target_modules=[]), "model.lora.target_modules"),
        (dict(dropout=1.0), "model.lora.dropout"),
    ]:
        with pytest.raises(ValueError, match=match):
            PolicyLoraConfig(**bad).validate()
    with pytest.raises(ValueError, match="model.lora.r"):
        validate(compose_cfg("model.lora.r=-2"))
    with pytest.raises(ValueError, match="model.lora.target_modules"):
        validate(compose_cfg("model.lora.r=8", "model.lora.target_modules=[]"))
    with pytest.raises(ConfigCompositionException):
        compose_cfg("model.autocast=fp16")  # a closed choice: auto | bf16 | off, checked at composition
    with pytest.raises(ValueError, match="algo.micro_batch_tokens"):
        validate(compose_cfg("algo.micro_batch_tokens=-1"))
    with pytest.raises(ConfigCompositionException):
        compose_cfg("model.lora.rank=8")  # a misspelt key fails at composition
    with pytest.raises(ValueError, match=r"\['c_attn'\] not found"):
        add_lora(load_policy(_model_cfg(), 0)[0], PolicyLoraConfig(r=4, target_modules=["q_proj", "c_attn"]), 0)
    cfg = compose_cfg("model.lora.r=8", "model.lora.alpha=32", "model.autocast=off", "algo.micro_batch_tokens=512")
    assert (cfg.model.lora.r, cfg.model.lora.alpha, cfg.model.lora.target_modules) == (8, 32.0, TARGETS)
    assert (cfg.model.autocast, cfg.algo.micro_batch_tokens) == ("off", 512)
    validate(cfg)


SMALL = [
    "algo.iterations=2",
    "algo.problems_per_iter=2",
    "algo.group_size=2",
    "algo.minibatch_size=2",
    "warm_start.steps=4",
    "warm_start.num_traces=64",
    "warm_start.batch_size=16",  # a warm start to cache and reuse
    "eval.num_problems=3",
    "eval.samples_per_problem=2",
    "eval.prover_samples=2",
    "eval.extrapolation=false",
    "eval.adaptation=false",
    "checkpoint_every=1",
    "logger.mode=disabled",
    "logger.progress_bar=false",
]


@pytest.mark.parametrize(
    "bonus",
    [
        ["bonus=none", "algo.micro_batch_tokens=64"],
        ["bonus=info_gain", "bonus.estimator=likelihood", "bonus.use_reference=true"],  # the reference's trunk and LM head
    ],
)
def test_lora_runs_end_to_end(compose_cfg, tmp_path, one_thread, bonus):
    from metarl_llm.jobs.evaluate_run import evaluate_run
    from metarl_llm.trainer import train

    cache = f"warm_start.cache_dir={tmp_path / 'cache'}"
    cfg = compose_cfg(*SMALL, *bonus, "model.lora.r=8", "algo.lr=1e-3", cache)
    run = tmp_path / "run"
    summary = train(cfg, run)
    assert 0.0 <= summary["heldout_success_final"] <= 1.0

    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/outcome" in r]
    assert [r["iteration"] for r in train_rows] == [1, 2]
    assert train_rows[0]["train/kl_ref"] == 0.0  # B = 0 at the start: the policy is its reference
    assert train_rows[1]["train/kl_ref"] != 0.0  # the adapter has moved
    assert all(r["train/logprob_mismatch_max"] < 1e-3 for r in train_rows)
    ckpt = run / "checkpoints" / "iter_000002"
    assert (ckpt / "policy" / "config.json").exists() and (ckpt / "adapter" / "adapter_config.json").exists()

    # the evaluation command on the checkpoint reproduces the run's final figures
    report = evaluate_run(run)
    assert report["budgets"]["1"]["metrics"]["success"] == summary["heldout_success_final"]
    assert report["budgets"]["1"]["curve"] == summary["heldout_success_curve"]

    if "bonus=none" not in bonus:
        return  # the warm start's cache key does not depend on the bonus: one check of its reuse is enough
    # a full fine-tuning run with the same settings reuses the warm start: LoRA concerns PPO only
    full = train(compose_cfg(*SMALL, *bonus, cache), tmp_path / "full")
    assert full["warm_start_cached"] is True and summary["warm_start_cached"] is False
    assert full["heldout_success_start"] == summary["heldout_success_start"]
