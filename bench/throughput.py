"""Training throughput: the project's trainer against trl's GRPOTrainer, same model, same
work; and the rollout engines on multi-episode trials.

    python bench/throughput.py --reps 5 --steps 6 --threads 1            # the committed run (both sections)
    python bench/throughput.py --quick --results-dir /tmp/tp               # a smoke run (seconds)
    python bench/throughput.py --sections trl --reps 3 --steps 4 budget.max_episode_tokens=64   # Hydra overrides for both sides
    python bench/throughput.py --sections engine --engine-overrides env=math   # the engine section alone, on math
    python bench/throughput.py --render-only                                 # rewrite the table from the JSON

On a GPU (the committed ``throughput_gpu`` run: a 113M-parameter model of the same
architecture built from a config, bf16 autocast on both sides):

    M="model.tiny.hidden_size=768 model.tiny.num_layers=12 model.tiny.num_heads=12 model.tiny.intermediate_size=3072"
    python bench/throughput.py --device cuda --bf16 --threads 4 --reps 5 --steps 6 --matmul-size 8192 \
        --name throughput_gpu $M --engine-overrides $M

Sections (``--sections``, comma-separated; each is one function, and its results replace
that section's entry in ``<results-dir>/<name>.json`` while other sections' entries stay):

``trl``  (:func:`bench_trl`): one optimisation iteration (rollout + scoring + advantages
    + one optimiser step) of three arms, on the same problems, model and batch:

    - ``ours_ppo``: ``metarl_llm.jobs.ppo.train`` with ``algo=ppo bonus=none`` (GAE, shared
      critic: value head on the policy trunk);
    - ``ours_grpo``: the same with ``algo=grpo`` (group-normalised returns, no critic);
    - ``trl_grpo``: ``trl.GRPOTrainer`` (transformers ``generate``, no vLLM; CPU or ``--device cuda``).

    In float32 our arms run with ``algo.old_logprobs=sampled`` (:func:`precision_overrides`;
    the trainer's default is ``recompute``): the PPO ratio's old log-probs are the rollout
    engine's own sampling log-probs, equal to a recomputation up to float rounding (~1e-6,
    tested), and PPO's values come from the value head on the engine's own hidden states,
    so neither arm runs a no-grad forward of the policy, as trl does not with
    ``num_iterations=1``. With ``--bf16`` the old log-probs are recomputed (bf16 passes of
    different shapes round differently). Everything else is the trainer's default (including
    ``algo.length_bucket_tokens`` and ``rollout.prefill_bucket_tokens``: rows of similar
    length share a forward pass).

``engine`` (:func:`bench_engine`): multi-episode trials (default ``budget.max_episodes=4``)
    played by the cached engine against re-encoding the history before every episode
    (``hf_generate``: ``model.generate`` per episode; ``reencode``: the project's own
    per-episode prefill), and the meta-prover continuing from the kept caches against
    re-encoding every prefix; see the function's docstring.

What is held equal
------------------
- Model: the project's default tiny Llama (``model.name_or_path=None``), weights built by
  ``metarl_llm.models.load_policy(cfg.model, cfg.seed)`` on both sides (trl gets a fresh
  copy saved and reloaded, so that it can build its reference model from the path).
- Problems: ``env=math`` with ``budget.max_episodes=1`` (single-episode trials), the same
  sequence of training problems on both sides (trl's dataset is the sequence the trainer
  draws, checked against the problem ids the trainer actually played).
- Batch: ``problems x group`` trials per iteration (default 8 x 8 = 64), one optimiser
  step per iteration: ``algo.ppo_epochs=1 algo.minibatch_size=64`` against trl's
  ``per_device_train_batch_size=64, gradient_accumulation_steps=1, num_generations=8,
  num_iterations=1`` (so ``steps_per_generation=1``).
- Length: every trial samples exactly ``budget.max_episode_tokens + budget.answer_max_tokens``
  tokens (32 + 12 by default). The untrained model would end episodes early (the newline
  and EOS are 2 of its 100 tokens), and the two trainers stop on different tokens, so the
  newline and EOS are made unreachable on both sides: the LM head gets a frozen bias of
  ``STOP_LOGIT`` at those ids (a model property, so sampling, scoring, the reference and
  trl's fused log-prob head all see it). Our trial is then one 32-token episode, the
  environment's forced-answer text (``"\\nAnswer:"``, 8 inserted tokens) and a 12-token
  forced answer; trl samples one 44-token completion (``max_completion_length = 32 + 12``).
  ``--allow-stops`` drops the bias (lengths then differ; per-token figures still hold).
- Reward: the environment's outcome on both sides. trl's reward function replays each
  completion in a ``metarl/Math-v0`` environment reset to the same problem: its first 32
  tokens as the episode, then (the environment having forced the answer) its last 12 as the
  answer, graded by the environment (``envs.grading``; model text is never executed).
- Objective constants: KL coefficient ``algo.kl_coef`` = trl ``beta`` (both a k3 penalty in
  the loss against a frozen reference), clip ``algo.clip_eps`` = trl ``epsilon``, lr
  ``algo.lr`` (constant), ``algo.max_grad_norm``, plain ``torch.optim.AdamW`` on both
  sides (trl ``optim="adamw_torch"``), float32, temperature 1, no top-k/top-p.

What each side does per iteration (and is timed)
------------------------------------------------
ours (``perf/iteration_s`` of the trainer's metrics.jsonl): rollout with the configured
engine (``rollout.engine``, default ``cached``; environment steps inside); a no-grad
forward of the reference (and of the policy only with ``--bf16``: ``algo.old_logprobs=
recompute``; in float32 the old log-probs and PPO's values come from the rollout); rewards, KL and
advantages; ``ppo_update`` (whitening, one minibatch forward + backward with entropy, in
passes of rows of similar length, clip, AdamW step). The held-out evaluation is outside
the timed iteration.
trl (``on_step_begin`` -> ``on_step_end`` of a ``TrainerCallback``): ``generate`` with a
dynamic KV cache, decoding, the reward function, the reference's no-grad forward (beta >
0), group advantages; then the loss forward (fused log-prob head, entropy), backward, clip,
AdamW step. trl skips the sampling policy's no-grad forward (old log-probs = detached
current ones when ``num_iterations=1``); so does our GRPO arm (sampling log-probs).

The first ``--warmup`` iterations of every run are excluded. Arms alternate within each
repetition (ours_ppo, trl_grpo, ours_grpo), so a slow phase of a shared machine hits all.

Figures per arm (medians over all measured iterations; per-repetition medians in the JSON)
-----------------------------------------------------------------------------------------
- ``step_s``: wall seconds per iteration; ``s_per_1k_trials`` = step_s / trials x 1000.
- ``sampled_tok_per_s``: policy-sampled tokens / rollout seconds. Rollout = ``run_trials``
  (ours: generation, environment steps and the inserted observation tokens) or trl's
  ``_generate_single_turn`` plus the reward function (generation and grading).
  ``gen_tok_per_s`` (trl only): the same over ``generate`` alone.
- ``score_s``: step_s - rollout_s - update_s: ours ``score_batch`` (no-grad forwards of the
  reference and, PPO, of the policy; alone in ``score_batch_s``), rewards and advantages;
  trl the reference's forward, padding and group advantages.
- ``trained_tok_per_s``: tokens forwarded with gradient in the update (non-pad tokens of
  every row: prompt, sampled and, ours, inserted observation tokens) / update seconds.
  Update = ``ppo_update`` (ours) or step time minus ``_generate_and_score_completions``
  (trl: loss forward, backward, clip, optimiser step, the Trainer's bookkeeping).
- ``step_tok_per_s``: the same non-pad tokens / step_s (whole-iteration throughput).
- ``update_flops_frac``: achieved FLOP/s of the update, 6 x N x D / update seconds (N the
  policy's trainable parameters, D the non-pad tokens of the update), as a fraction of the
  measured float32 ``torch.matmul`` FLOP/s (2 n^3 / t for n x n, ``--threads`` threads,
  median of ``--matmul-reps``); ``update_flops_attn_frac`` adds causal attention,
  6 x n_layers x d_model x sum_rows(len^2).
- ``speedup_vs_trl`` = trl's s_per_1k_trials / the arm's, per repetition (adjacent runs),
  median over repetitions (> 1: ours is faster).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from metarl_llm.runtime.setup import compose_config as compose

STOP_LOGIT = -1.0e4  # bias on the blocked ids: exp(-1e4) is 0 in float64, and 0 * -1e4 keeps entropies finite
OUR_ARMS = {"ours_ppo": "ppo", "ours_grpo": "grpo"}
TRL_ARM = "trl_grpo"
ARM_ORDER = ("ours_ppo", TRL_ARM, "ours_grpo")  # ours, trl, ours: alternating within a repetition

# Fixed overrides of the trl section (the user's come after and may change the budget sizes,
# the env options, the model size, ...); the batch shape and update count come from the CLI.
TRL_SECTION_OVERRIDES = [
    "env=math",
    "bonus=none",
    "budget.max_episodes=1",
    "warm_start.steps=0",
    "algo.ppo_epochs=1",
    "eval.every=0",
    "eval.num_problems=1",
    "eval.samples_per_problem=1",
    "eval.prover_samples=1",
    "eval.extrapolation=false",
    "eval.adaptation=false",  # the iteration is what is timed: no 8-episode adaptation trials at the start and end
    "checkpoint_every=0",
    "logger.mode=disabled",
    "logger.progress_bar=false",
]
QUICK_OVERRIDES = ["budget.max_episode_tokens=8", "budget.answer_max_tokens=4"]


def precision_overrides(args) -> list[str]:
    """Device and precision of our arms. float32 (default): no autocast and the sampling
    log-probs as the PPO ratio's old log-probs (``algo.old_logprobs=sampled``: equal to a
    recomputation up to ~1e-6). ``--bf16``: the rollout, scoring and update forwards under
    bf16 autocast (trl: ``bf16=True``, accelerate's autocast); bf16 sampling and scoring
    passes round differently, so the old log-probs are recomputed (``recompute``: one more
    no-grad policy forward than trl, which takes the detached current ones). The cuDNN
    attention backend is set process-wide for both sides (``--cudnn-attention``)."""
    common = [f"device={args.device}", f"model.cudnn_attention={str(args.cudnn_attention).lower()}"]
    if args.bf16:
        return [*common, "model.autocast=bf16", "algo.old_logprobs=recompute"]
    return [*common, "model.autocast=off", "algo.old_logprobs=sampled"]


def sync(device: str) -> None:
    """Wait for queued device work, so that a host clock read after it times it."""
    if device == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- helpers


def median(xs) -> float:
    xs = [float(x) for x in xs]
    return statistics.median(xs) if xs else float("nan")


def update_flops(
    num_params: int, tokens: int, row_lengths: list[int] | None = None, n_layers: int = 0, d_model: int = 0
) -> float:
    """Training FLOPs of one optimiser step: 6 x N x D (forward 2ND + backward 4ND), plus,
    with ``row_lengths``, causal attention 6 x n_layers x d_model x sum_rows(len^2)
    (scores QK^T and the weighted sum AV, 2 x len^2 x d per layer forward, x 3 with backward)."""
    flops = 6.0 * num_params * tokens
    if row_lengths is not None:
        flops += 6.0 * n_layers * d_model * float(sum(int(n) ** 2 for n in row_lengths))
    return flops


def matmul_flops_per_s(
    n: int = 1024, reps: int = 7, threads: int = 1, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> dict:
    """Measured ``torch.matmul`` of two n x n random matrices of ``dtype`` on ``device``:
    2 n^3 / seconds, median of ``reps`` (CUDA: synchronised before each clock read)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, generator=g).to(device, dtype)
        b = torch.randn(n, n, generator=g).to(device, dtype)
        for _ in range(3):
            torch.matmul(a, b)
        times = []
        for _ in range(reps):
            sync(device)
            t0 = time.perf_counter()
            torch.matmul(a, b)
            sync(device)
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    flops = 2.0 * n**3
    return {
        "n": n,
        "threads": threads,
        "dtype": str(dtype).removeprefix("torch."),
        "device": device,
        "seconds": times,
        "flops_per_s": flops / median(times),
    }


def block_stop_tokens(model: torch.nn.Module, ids: list[int]) -> None:
    """Make ``ids`` unreachable: the LM head becomes a Linear with the same (tied) weight and a
    frozen bias of STOP_LOGIT at ``ids`` (0 elsewhere). Every path that computes logits sees
    it: sampling, scoring, deep copies (the reference) and trl's fused log-prob head."""
    old = model.get_output_embeddings()
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True, device=old.weight.device, dtype=old.weight.dtype)
    head.weight = old.weight  # the same Parameter: tying to the input embedding is kept
    bias = torch.zeros(old.out_features, dtype=old.weight.dtype, device=old.weight.device)
    bias[torch.as_tensor(sorted(set(ids)), dtype=torch.long)] = STOP_LOGIT
    head.bias = torch.nn.Parameter(bias, requires_grad=False)
    model.set_output_embeddings(head)


def stop_ids(tokenizer) -> list[int]:
    """Ids that end an episode (the newline) or a completion (EOS) for either trainer."""
    from metarl_llm.core.trial import StreamCodec

    codec = StreamCodec(tokenizer, "\n", "Answer:")
    return sorted(set(codec.delimiter_ids) | {tokenizer.eos_token_id})


def trainable_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def environment_info(threads: int, device: str = "cpu") -> dict:
    import transformers
    import trl

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "device": device,
    }
    if device == "cuda":
        info.update(
            gpu=torch.cuda.get_device_name(),
            cuda=torch.version.cuda,
            gpu_memory_gib=torch.cuda.get_device_properties(0).total_memory / 2**30,
        )
    return info


# ------------------------------------------------------------------ the trl section


def problem_sequence(cfg, iterations: int) -> list[dict]:
    """The training problems the trainer plays, in order: it draws ``problems_per_iter``
    reset seeds per iteration from ``np.random.default_rng(cfg.seed)`` (metarl_llm.jobs.ppo)."""
    from metarl_llm.runtime.setup import env_factory

    env = env_factory(cfg)("train")
    rng = np.random.default_rng(cfg.seed)
    out = []
    for _ in range(iterations):
        for s in rng.integers(0, 2**31 - 1, size=cfg.algo.problems_per_iter):
            prompt, info = env.reset(seed=int(s))
            out.append({"prompt": prompt, "index": int(info["index"]), "problem_id": info["problem_id"]})
    return out


@contextlib.contextmanager
def patched(module, **replacements):
    old = {k: getattr(module, k) for k in replacements}
    for k, v in replacements.items():
        setattr(module, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(module, k, v)


def run_ours(cfg, run_dir: Path, block: bool) -> tuple[list[dict], dict]:
    """One ``metarl_llm.jobs.ppo.train`` run; per-iteration records and run facts.

    The trainer's own functions are wrapped (called through unchanged) to time the rollout,
    the scoring and the update and to count their tokens; the iteration time is the
    trainer's ``perf/iteration_s``."""
    import metarl_llm.jobs.common as C  # the PPO job's set-up (load_policy)
    import metarl_llm.jobs.ppo as T  # the PPO job's stages
    from metarl_llm.trainer import train

    rec = {"rollout": [], "score": [], "update": []}
    facts = {}

    def load_policy(*a, **kw):
        policy, tok = orig["load_policy"](*a, **kw)
        facts["num_params"] = trainable_params(policy)
        facts["n_layers"], facts["d_model"] = policy.config.num_hidden_layers, policy.config.hidden_size
        if block:
            block_stop_tokens(policy, stop_ids(tok))
        return policy, tok

    def run_trials(*a, **kw):
        sync(cfg.device)
        t0 = time.perf_counter()
        trials = orig["run_trials"](*a, **kw)
        sync(cfg.device)
        rec["rollout"].append(
            {
                "s": time.perf_counter() - t0,
                "trials": len(trials),
                "sampled_tokens": sum(t.policy_tokens for t in trials),
                "problem_ids": [t.problem_id for t in trials][:: cfg.algo.group_size],
                "episodes": float(np.mean([len(t.episode_texts) for t in trials])),
            }
        )
        return trials

    def score_batch(*a, **kw):
        sync(cfg.device)
        t0 = time.perf_counter()
        out = orig["score_batch"](*a, **kw)
        sync(cfg.device)
        rec["score"].append({"s": time.perf_counter() - t0})
        return out

    def ppo_update(actor_critic, optimizer, batch, *a, **kw):
        sync(cfg.device)
        t0 = time.perf_counter()
        stats = orig["ppo_update"](actor_critic, optimizer, batch, *a, **kw)
        sync(cfg.device)
        lengths = batch.attention_mask.sum(1).tolist()
        rec["update"].append(
            {
                "s": time.perf_counter() - t0,
                "tokens": int(stats["update_tokens"]),
                "rows": len(lengths),
                "row_lengths": [int(n) for n in lengths],
                "width": int(batch.input_ids.shape[1]),
            }
        )
        return stats

    orig = {"load_policy": C.load_policy, **{k: getattr(T, k) for k in ("run_trials", "score_batch", "ppo_update")}}
    if run_dir.exists():
        shutil.rmtree(run_dir)
    with patched(C, load_policy=load_policy), patched(T, run_trials=run_trials, score_batch=score_batch, ppo_update=ppo_update):
        train(cfg, run_dir)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if "perf/iteration_s" in r]
    if not (len(rows) == len(rec["rollout"]) == len(rec["update"]) == cfg.algo.iterations):
        raise RuntimeError(
            f"{run_dir}: {len(rows)} logged iterations, {len(rec['rollout'])} rollouts, "
            f"{len(rec['update'])} updates; expected {cfg.algo.iterations} of each"
        )
    steps = []
    for r, ro, sc, up in zip(rows, rec["rollout"], rec["score"], rec["update"]):
        steps.append(
            {
                "iteration": r["iteration"],
                "step_s": r["perf/iteration_s"],
                "rollout_s": ro["s"],
                "score_s": r["perf/iteration_s"] - ro["s"] - up["s"],
                "score_batch_s": sc["s"],
                "update_s": up["s"],
                "trials": ro["trials"],
                "sampled_tokens": ro["sampled_tokens"],
                "update_tokens": up["tokens"],
                "update_rows": up["rows"],
                "update_width": up["width"],
                "update_row_lengths": up["row_lengths"],
                "episodes_per_trial": ro["episodes"],
                "outcome": r.get("train/outcome"),
                "problem_ids": ro["problem_ids"],
                "trainer_rollout_tokens_per_s": r.get("perf/rollout_tokens_per_s"),
                "trainer_update_tokens_per_s": r.get("perf/update_tokens_per_s"),
            }
        )
    return steps, facts


def env_reward(cfg, tokenizer, timer: dict):
    """trl reward function: each completion replayed in the math environment reset to its
    problem, its first ``max_episode_tokens`` tokens as the (single) episode and, once the
    environment forces the answer, the rest as the forced answer; the reward is the
    environment's outcome. Model text is only graded (envs.grading), never executed."""
    from metarl_llm.runtime.setup import env_factory

    env = env_factory(cfg)("train")
    split = cfg.budget.max_episode_tokens

    def math_env_outcome(prompts, completions, completion_ids, index, **_):
        t0 = time.perf_counter()
        rewards = []
        for ids, i in zip(completion_ids, index):
            env.reset(options={"index": int(i)})
            _, r, done, _, info = env.step(tokenizer.decode(ids[:split], skip_special_tokens=True))
            if not done:
                if not info.get("forcing_answer"):
                    raise RuntimeError(
                        "the environment did not force the answer after one episode (budget.max_episodes must be 1)"
                    )
                _, r, done, _, _ = env.step(tokenizer.decode(ids[split:], skip_special_tokens=True))
            rewards.append(float(r))
        timer["reward_s"].append(time.perf_counter() - t0)
        timer["reward_indices"].append([int(i) for i in index])
        return rewards

    return math_env_outcome


def run_trl(cfg, problems: list[dict], work_dir: Path, block: bool, threads: int, bf16: bool = False) -> tuple[list[dict], dict]:
    """One ``trl.GRPOTrainer`` run of ``cfg.algo.iterations`` steps on ``problems`` (in order);
    per-step records and run facts. On ``cfg.device`` (cpu or cuda); ``bf16``: trl's
    ``bf16=True`` (accelerate's bf16 autocast, float32 weights), as our ``model.autocast=bf16``."""
    import datasets
    import transformers
    from transformers import AutoModelForCausalLM, TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import GRPOConfig, GRPOTrainer

    from metarl_llm.models import load_policy

    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    a, b = cfg.algo, cfg.budget
    n_trials = a.problems_per_iter * a.group_size
    if work_dir.exists():
        shutil.rmtree(work_dir)
    init_dir = work_dir / "init"
    policy, tokenizer = load_policy(cfg.model, cfg.seed if cfg.warm_start.seed is None else cfg.warm_start.seed)
    policy.save_pretrained(init_dir)
    tokenizer.save_pretrained(init_dir)
    model = AutoModelForCausalLM.from_pretrained(init_dir)  # config._name_or_path: trl builds its reference from it
    with torch.no_grad():
        same = all(torch.equal(p, q) for p, q in zip(policy.state_dict().values(), model.state_dict().values()))
    if not same:
        raise RuntimeError("the reloaded trl policy differs from load_policy's weights")
    facts = {
        "num_params": trainable_params(model),
        "n_layers": model.config.num_hidden_layers,
        "d_model": model.config.hidden_size,
    }
    if block:
        block_stop_tokens(model, stop_ids(tokenizer))
    timer = {"step_begin": [], "step_end": [], "gen": [], "gas": [], "reward_s": [], "reward_indices": []}

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            torch.set_num_threads(threads)  # in case a library changed it

        def on_step_begin(self, args, state, control, **kw):
            sync(cfg.device)
            timer["step_begin"].append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            sync(cfg.device)
            timer["step_end"].append(time.perf_counter())

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        args = GRPOConfig(
            output_dir=str(work_dir / "trl"),
            per_device_train_batch_size=n_trials,
            gradient_accumulation_steps=1,
            num_generations=a.group_size,
            num_iterations=1,
            max_completion_length=b.max_episode_tokens + b.answer_max_tokens,
            beta=a.kl_coef,
            epsilon=a.clip_eps,
            learning_rate=a.lr,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=a.weight_decay,
            max_grad_norm=a.max_grad_norm,
            optim="adamw_torch",
            max_steps=a.iterations,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            use_vllm=False,
            use_cpu=cfg.device == "cpu",
            bf16=bf16,
            fp16=False,
            seed=cfg.seed,
            shuffle_dataset=False,
            report_to=[],
            logging_strategy="no",
            save_strategy="no",
            disable_tqdm=True,
            log_completions=False,
            dataloader_num_workers=0,
            remove_unused_columns=False,
        )
    dataset = datasets.Dataset.from_list([{"prompt": p["prompt"], "index": p["index"]} for p in problems])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=env_reward(cfg, tokenizer, timer),
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[StepTimer()],
        )
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)  # the end-of-training metrics print
    if block and trainer.ref_model is not None:
        ref = trainer.accelerator.unwrap_model(trainer.ref_model)
        block_stop_tokens(ref, stop_ids(tokenizer))

    gen_orig, gas_orig = trainer._generate_single_turn, trainer._generate_and_score_completions

    def generate_single_turn(*args_, **kw):
        sync(cfg.device)
        t0 = time.perf_counter()
        completion_ids, logprobs = gen_orig(*args_, **kw)
        sync(cfg.device)
        timer["gen"].append({"s": time.perf_counter() - t0, "tokens": sum(len(c) for c in completion_ids)})
        return completion_ids, logprobs

    def generate_and_score(*args_, **kw):
        sync(cfg.device)
        t0 = time.perf_counter()
        out = gas_orig(*args_, **kw)
        sync(cfg.device)
        lengths = (out["prompt_mask"].sum(1) + out["completion_mask"].sum(1)).tolist()
        timer["gas"].append(
            {
                "s": time.perf_counter() - t0,
                "completion_tokens": int(out["completion_mask"].sum()),
                "row_lengths": [int(n) for n in lengths],
                "width": int(out["prompt_ids"].shape[1] + out["completion_ids"].shape[1]),
            }
        )
        return out

    trainer._generate_single_turn = generate_single_turn
    trainer._generate_and_score_completions = generate_and_score
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5's gradient_checkpointing renames, raised in trl
        trainer.train()
    n = a.iterations
    if not (len(timer["step_begin"]) == len(timer["step_end"]) == len(timer["gen"]) == len(timer["gas"]) == n):
        raise RuntimeError(f"trl: {len(timer['step_end'])} steps, {len(timer['gen'])} generations; expected {n}")
    steps = []
    for k in range(n):
        step_s = timer["step_end"][k] - timer["step_begin"][k]
        gen, gas = timer["gen"][k], timer["gas"][k]
        tokens = sum(gas["row_lengths"])
        steps.append(
            {
                "iteration": k + 1,
                "step_s": step_s,
                "generate_s": gen["s"],
                "reward_s": timer["reward_s"][k],
                "rollout_s": gen["s"] + timer["reward_s"][k],
                "score_s": gas["s"] - gen["s"] - timer["reward_s"][k],
                "update_s": step_s - gas["s"],
                "trials": len(gas["row_lengths"]),
                "sampled_tokens": gas["completion_tokens"],
                "update_tokens": tokens,
                "update_rows": len(gas["row_lengths"]),
                "update_width": gas["width"],
                "update_row_lengths": gas["row_lengths"],
                "problem_indices": timer["reward_indices"][k][:: a.group_size],
            }
        )
    facts["torch_threads_after"] = torch.get_num_threads()
    return steps, facts


def summarise(steps: list[dict], facts: dict, peak: float) -> dict:
    """Per-step derived figures (added to each record) and the arm's medians."""
    for s in steps:
        s["s_per_1k_trials"] = s["step_s"] / s["trials"] * 1000
        s["sampled_tok_per_s"] = s["sampled_tokens"] / s["rollout_s"]
        if "generate_s" in s:
            s["gen_tok_per_s"] = s["sampled_tokens"] / s["generate_s"]
        s["trained_tok_per_s"] = s["update_tokens"] / s["update_s"]
        s["step_tok_per_s"] = s["update_tokens"] / s["step_s"]
        f6 = update_flops(facts["num_params"], s["update_tokens"])
        fa = update_flops(facts["num_params"], s["update_tokens"], s["update_row_lengths"], facts["n_layers"], facts["d_model"])
        s["update_flops_per_s"] = f6 / s["update_s"]
        s["update_flops_frac"] = f6 / s["update_s"] / peak
        s["update_flops_attn_frac"] = fa / s["update_s"] / peak
    keys = [
        "step_s",
        "s_per_1k_trials",
        "rollout_s",
        "score_s",
        "update_s",
        "sampled_tok_per_s",
        "trained_tok_per_s",
        "step_tok_per_s",
        "update_flops_per_s",
        "update_flops_frac",
        "update_flops_attn_frac",
        "sampled_tokens",
        "update_tokens",
        "trials",
    ]
    if steps and "generate_s" in steps[0]:
        keys += ["generate_s", "reward_s", "gen_tok_per_s"]
    out = {k: median(s[k] for s in steps) for k in keys}
    out["sampled_tokens_per_trial"] = median(s["sampled_tokens"] / s["trials"] for s in steps)
    out["update_tokens_per_trial"] = median(s["update_tokens"] / s["trials"] for s in steps)
    out["measured_steps"] = len(steps)
    return out


def bench_trl(args, overrides: list[str], peak: float) -> dict:
    """Section ``trl``: ours (PPO and GRPO) against trl's GRPOTrainer; see the module docstring."""
    n_trials = args.problems * args.group
    base = [
        *TRL_SECTION_OVERRIDES,
        f"algo.problems_per_iter={args.problems}",
        f"algo.group_size={args.group}",
        f"algo.minibatch_size={n_trials}",
        f"algo.iterations={args.warmup + args.steps}",
        f"threads={args.threads}",
        f"seed={args.seed}",
        *precision_overrides(args),
        *(QUICK_OVERRIDES if args.quick else []),
        *overrides,
    ]
    cfgs = {arm: compose([*base, f"algo={algo}"]) for arm, algo in OUR_ARMS.items()}
    cfg = cfgs["ours_grpo"]
    if cfg.budget.max_episodes != 1:
        raise SystemExit("the trl section compares single-episode trials: budget.max_episodes must stay 1")
    if cfg.budget.max_total_tokens < cfg.budget.max_episode_tokens:
        raise SystemExit(
            f"budget.max_total_tokens={cfg.budget.max_total_tokens} would cut our episode below "
            f"budget.max_episode_tokens={cfg.budget.max_episode_tokens} (trl samples the full length): "
            "raise it too"
        )
    problems = problem_sequence(cfg, cfg.algo.iterations)
    expected_ids = [p["problem_id"] for p in problems]
    arms = [a for a in ARM_ORDER if a in args.arms]
    runs: dict[str, list[dict]] = {a: [] for a in arms}
    facts: dict[str, dict] = {}
    out_root = Path(args.out_root)
    for rep in range(args.reps):
        for arm in arms:
            t0 = time.perf_counter()
            if arm == TRL_ARM:
                steps, f = run_trl(cfg, problems, out_root / f"{arm}_rep{rep}", not args.allow_stops, args.threads, args.bf16)
                played = [i for s in steps for i in s.pop("problem_indices")]
                if played != [p["index"] for p in problems]:
                    raise RuntimeError("trl played other problems than the trainer's sequence")
            else:
                steps, f = run_ours(cfgs[arm], out_root / f"{arm}_rep{rep}", not args.allow_stops)
                played = [pid for s in steps for pid in s.pop("problem_ids")]
                if played != expected_ids:
                    raise RuntimeError(f"{arm} played other problems than the expected sequence")
            facts[arm] = f
            for s in steps:
                s["rep"] = rep
            runs[arm].append(steps)
            measured = steps[args.warmup :]
            print(
                f"rep {rep} {arm}: {median(s['step_s'] for s in measured):.3f} s/iteration (median of {len(measured)}), "
                f"{median(s['sampled_tokens'] / s['trials'] for s in measured):.1f} sampled tokens/trial, "
                f"run {time.perf_counter() - t0:.1f} s",
                flush=True,
            )
    summary = {}
    for arm in arms:
        measured = [s for steps in runs[arm] for s in steps[args.warmup :]]
        summary[arm] = summarise(measured, facts[arm], peak)
        summary[arm]["per_rep_step_s"] = [median(s["step_s"] for s in steps[args.warmup :]) for steps in runs[arm]]
        summary[arm]["per_rep_s_per_1k_trials"] = [
            median(s["s_per_1k_trials"] for s in steps[args.warmup :]) for steps in runs[arm]
        ]
    if TRL_ARM in arms:
        for arm in arms:
            if arm == TRL_ARM:
                continue
            ratios = [t / o for t, o in zip(summary[TRL_ARM]["per_rep_s_per_1k_trials"], summary[arm]["per_rep_s_per_1k_trials"])]
            summary[arm]["speedup_vs_trl_per_rep"] = ratios
            summary[arm]["speedup_vs_trl"] = median(ratios)
            summary[arm]["speedup_vs_trl_pooled"] = summary[TRL_ARM]["s_per_1k_trials"] / summary[arm]["s_per_1k_trials"]
    b = cfg.budget
    settings = {
        "overrides": base,
        "arms": {**{k: f"metarl_llm.jobs.ppo.train algo={v}" for k, v in OUR_ARMS.items()}, TRL_ARM: "trl.GRPOTrainer"},
        "problems_per_iter": args.problems,
        "group_size": args.group,
        "trials_per_step": n_trials,
        "device": cfg.device,
        "precision": "bf16 autocast" if args.bf16 else "float32",
        "cudnn_attention": args.cudnn_attention,
        "reps": args.reps,
        "steps": args.steps,
        "warmup": args.warmup,
        "seed": args.seed,
        "episode_tokens": b.max_episode_tokens,
        "answer_tokens": b.answer_max_tokens,
        "trl_max_completion_length": b.max_episode_tokens + b.answer_max_tokens,
        "stop_tokens_blocked": not args.allow_stops,
        "stop_logit": STOP_LOGIT,
        "rollout_engine": cfg.rollout.engine,
        "old_logprobs": cfg.algo.old_logprobs,
        "length_bucket_tokens": cfg.algo.length_bucket_tokens,
        "prefill_bucket_tokens": cfg.rollout.prefill_bucket_tokens,
        "kl_coef_beta": cfg.algo.kl_coef,
        "clip_eps": cfg.algo.clip_eps,
        "lr": cfg.algo.lr,
        "optimizer_steps_per_iteration": 1,
        "num_params": facts[arms[0]]["num_params"],
        "problems": [p["problem_id"] for p in problems],
    }
    return {"settings": settings, "summary": summary, "steps": runs, "facts": facts}


def table_trl(section: dict) -> str:
    """Markdown table of the trl section's medians."""
    st, sm = section["settings"], section["summary"]
    lines = [
        f"Single-episode `env=math`, {st['problems_per_iter']} problems x {st['group_size']} trials = "
        f"{st['trials_per_step']} trials per iteration, one optimiser step per iteration, "
        f"{st['episode_tokens']} + {st['answer_tokens']} sampled tokens per trial "
        f"({'stop tokens blocked: equal lengths' if st['stop_tokens_blocked'] else 'natural lengths'}), "
        f"{st['num_params']:,} trainable parameters, {st.get('device', 'cpu')}, {st.get('precision', 'float32')}, "
        f"KL coefficient / beta {st['kl_coef_beta']}, "
        f"rollout engine `{st['rollout_engine']}`, our arms with `algo.old_logprobs={st.get('old_logprobs', 'recompute')}` "
        f"(`algo.length_bucket_tokens={st.get('length_bucket_tokens', 0)}`, "
        f"`rollout.prefill_bucket_tokens={st.get('prefill_bucket_tokens', 0)}`). "
        f"Medians over {st['reps']} repetitions x {st['steps']} iterations "
        f"(first {st['warmup']} of each run excluded).",
        "",
        "Speedup vs trl: trl's s / 1k trials over the arm's, median over repetitions of the ratio of adjacent runs "
        "(in brackets: the ratio of the medians pooled over all iterations).",
        "",
        "| arm | s / iteration | s / 1k trials | speedup vs trl | rollout s | scoring s | update s | sampled tok/s | "
        "trained tok/s | whole-step tok/s | update FLOP/s (6ND) | of matmul peak | with attention |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for arm in ARM_ORDER:
        if arm not in sm:
            continue
        r = sm[arm]
        speed = (
            f"{r['speedup_vs_trl']:.2f}x ({r['speedup_vs_trl_pooled']:.2f}x)"
            if "speedup_vs_trl" in r
            else ("1 (reference)" if arm == TRL_ARM else "n/a")
        )
        sampled = f"{r['sampled_tok_per_s']:,.0f}"
        if "gen_tok_per_s" in r:
            sampled += f" ({r['gen_tok_per_s']:,.0f} generate only)"
        lines.append(
            f"| {arm} | {r['step_s']:.3f} | {r['s_per_1k_trials']:.2f} | {speed} | {r['rollout_s']:.3f} | {r['score_s']:.3f} | "
            f"{r['update_s']:.3f} | {sampled} | {r['trained_tok_per_s']:,.0f} | {r['step_tok_per_s']:,.0f} | "
            f"{r['update_flops_per_s'] / 1e9:.2f} G | {r['update_flops_frac']:.1%} | {r['update_flops_attn_frac']:.1%} |"
        )
    lines.append("")
    lines.append(
        "Tokens per trial (median): "
        + "; ".join(
            f"{arm} {sm[arm]['sampled_tokens_per_trial']:.0f} sampled, {sm[arm]['update_tokens_per_trial']:.1f} trained"
            for arm in ARM_ORDER
            if arm in sm
        )
        + "."
    )
    if any("speedup_vs_trl_per_rep" in sm[a] for a in sm):
        lines.append(
            "Speedup per repetition: "
            + "; ".join(
                f"{arm} " + ", ".join(f"{x:.2f}" for x in sm[arm]["speedup_vs_trl_per_rep"])
                for arm in ARM_ORDER
                if arm in sm and "speedup_vs_trl_per_rep" in sm[arm]
            )
            + "."
        )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ the engine section

ENGINE_ARMS = ("cached", "hf_generate", "reencode")
MP_ARMS = ("meta_prover_cached", "meta_prover_reencode")


def engine_config(args):
    """The engine section's config: ``budget.max_episodes=--engine-episodes`` and, unless
    ``--engine-overrides`` set it, ``budget.max_total_tokens`` = episodes x max_episode_tokens
    (so that the token budget does not force the answer before the last episode)."""
    overrides = [
        f"budget.max_episodes={args.engine_episodes}",
        f"device={args.device}",
        f"threads={args.threads}",
        f"seed={args.seed}",
        *(QUICK_OVERRIDES if args.quick else []),
        *args.engine_overrides,
    ]
    cfg = compose(overrides)
    if not any(o.lstrip("+").startswith("budget.max_total_tokens=") for o in args.engine_overrides):
        overrides.append(f"budget.max_total_tokens={cfg.budget.max_episodes * cfg.budget.max_episode_tokens}")
        cfg = compose(overrides)
    return cfg, overrides


def bench_engine(args, overrides: list[str], peak: float) -> dict:
    """Section ``engine``: multi-episode trials played by the cached engine (the KV cache kept
    across episodes, observations appended) against re-encoding the history before every
    episode: ``hf_generate`` (``model.generate`` once per episode, the transformers baseline)
    and ``reencode`` (the project's own per-episode prefill, same counter-based draws as
    ``cached``, so its tokens must equal cached's); then the sample estimator's meta-prover
    (``bonus.num_samples`` forced answers at every episode boundary) continuing from the
    kept caches against re-encoding every boundary prefix (``rollout.sample``).

    Model: the untrained tiny policy (``load_policy``, no warm start), stop tokens NOT
    blocked; default environment (planted_subseq, ``--engine-overrides`` to change): with
    ``budget.max_episodes=--engine-episodes``, an episode ends at the newline or EOS (2 of
    the 100 tokens) or at ``budget.max_episode_tokens``, and after the last episode the
    environment forces the answer. Same problems, keys and budget for every arm; the arms
    alternate within each repetition; the first repetition is a warm-up (not reported). The
    cached arm keeps every trial's cache (``keep_cache=True``, the copies timed with it) for
    the meta-prover. ``overrides`` (the trl section's) are not used here."""

    from metarl_llm.core.trial import StreamCodec
    from metarl_llm.models import autocast, load_policy
    from metarl_llm.rollout.engine import run_trials
    from metarl_llm.rollout.meta_prover import boundary_prefixes, meta_prover_success
    from metarl_llm.runtime.setup import env_factory

    cfg, eng_overrides = engine_config(args)
    policy, tokenizer = load_policy(cfg.model, cfg.seed)
    policy.to(args.device).eval()
    amp = torch.bfloat16 if args.bf16 else None  # --bf16: every arm's forwards under bf16 autocast
    codec = StreamCodec(tokenizer, "\n", cfg.env.forced_answer_text)
    make = env_factory(cfg)
    n = args.engine_trials
    group = max(1, min(args.group, n))
    envs = [make("train") for _ in range(n)]
    resets = [{"seed": 1000 + i // group} for i in range(n)]
    groups = [i // group for i in range(n)]
    times = {a: [] for a in ENGINE_ARMS}
    tokens = {a: [] for a in ENGINE_ARMS}
    episodes = {a: [] for a in ENGINE_ARMS}
    forced = {a: [] for a in ENGINE_ARMS}
    full = {a: [] for a in ENGINE_ARMS}  # share of trials that played every episode, then the forced answer
    mp_times = {a: [] for a in MP_ARMS}
    mp_rows = []
    identical = []
    for rep in range(args.engine_reps + 1):
        out = {}
        for arm in ENGINE_ARMS:
            sync(args.device)
            t0 = time.perf_counter()
            with autocast(args.device, amp):
                trials = run_trials(
                    policy,
                    codec,
                    envs,
                    resets,
                    groups,
                    cfg.budget,
                    torch.Generator().manual_seed(rep),
                    engine=arm,
                    keep_cache=arm == "cached",
                )
            sync(args.device)
            dt = time.perf_counter() - t0
            out[arm] = trials
            if rep:
                times[arm].append(dt)
                tokens[arm].append(sum(t.policy_tokens for t in trials))
                episodes[arm].append(float(np.mean([len(t.episode_texts) for t in trials])))
                forced[arm].append(float(np.mean([t.forced for t in trials])))
                full[arm].append(float(np.mean([len(t.episode_texts) == cfg.budget.max_episodes + 1 for t in trials])))
        identical.append(all(a.ids == b.ids for a, b in zip(out["cached"], out["reencode"])))
        trials = out["cached"]
        ends = [boundary_prefixes(t) for t in trials]
        for kind in MP_ARMS:
            if kind == "meta_prover_reencode":
                for t in trials:
                    t.cache = None  # no kept cache: every boundary prefix is encoded again
            sync(args.device)
            t0 = time.perf_counter()
            with autocast(args.device, amp):
                meta_prover_success(
                    policy,
                    codec,
                    trials,
                    ends,
                    cfg.bonus.num_samples,
                    cfg.budget.answer_max_tokens,
                    torch.Generator().manual_seed(rep),
                )
            sync(args.device)
            if rep:
                mp_times[kind].append(time.perf_counter() - t0)
        if rep:
            mp_rows.append(sum(len(e) for e in ends) * cfg.bonus.num_samples)
        print(
            f"rep {rep}{' (warm-up)' if not rep else ''}: "
            + ", ".join(f"{a} {times[a][-1]:.2f} s" for a in ENGINE_ARMS if rep)
            + (", " if rep else "")
            + f"cached == reencode tokens: {identical[-1]}",
            flush=True,
        )
    arms = {}
    for a in ENGINE_ARMS:
        arms[a] = {
            "seconds": times[a],
            "median_s": median(times[a]),
            "s_per_1k_trials": median(times[a]) * 1000 / n,
            "sampled_tokens": tokens[a],
            "tokens_per_s": median(tk / s for tk, s in zip(tokens[a], times[a])),
            "episodes_per_trial": median(episodes[a]),
            "forced_answer_rate": median(forced[a]),
            "all_episodes_rate": median(full[a]),
            "sampled_tokens_per_trial": median(tk / n for tk in tokens[a]),
        }
    for a in ("hf_generate", "reencode"):  # per repetition (adjacent runs), then the median
        arms[a]["cached_speedup_per_rep"] = [x / c for x, c in zip(times[a], times["cached"])]
        arms[a]["cached_speedup"] = median(arms[a]["cached_speedup_per_rep"])
    mp = {k: {"seconds": v, "median_s": median(v)} for k, v in mp_times.items()}
    mp_ratios = [r / c for r, c in zip(mp_times["meta_prover_reencode"], mp_times["meta_prover_cached"])]
    b = cfg.budget
    return {
        "settings": {
            "overrides": eng_overrides,
            "trials": n,
            "group": group,
            "reps": args.engine_reps,
            "budget": dataclasses.asdict(b),
            "env": cfg.env.name,
            "model": dataclasses.asdict(cfg.model.tiny),
            "num_params": trainable_params(policy),
            "meta_prover_samples": cfg.bonus.num_samples,
            "stop_tokens_blocked": False,
            "device": args.device,
            "precision": "bf16 autocast" if args.bf16 else "float32",
        },
        "cached_equals_reencode_tokens": all(identical),
        "cached_equals_reencode_per_rep": identical,
        "arms": arms,
        "speedup_vs_hf_generate": arms["hf_generate"]["cached_speedup"],
        "speedup_vs_reencode": arms["reencode"]["cached_speedup"],
        "meta_prover": mp,
        "meta_prover_rows": median(mp_rows),
        "meta_prover_speedup_per_rep": mp_ratios,
        "meta_prover_speedup": median(mp_ratios),
    }


def table_engine(section: dict) -> str:
    """Markdown table of the engine section's medians."""
    st, arms = section["settings"], section["arms"]
    b = st["budget"]
    lines = [
        f"`env={st['env']}`, {st['trials']} trials ({st['trials'] // st['group']} problems x {st['group']}), "
        f"`budget.max_episodes={b['max_episodes']}`, up to {b['max_episode_tokens']} tokens per episode "
        f"(`budget.max_total_tokens={b['max_total_tokens']}`), then a forced answer of up to {b['answer_max_tokens']} tokens; "
        f"the untrained tiny model ({st['num_params']:,} parameters, {st.get('device', 'cpu')}, {st.get('precision', 'float32')}), stop tokens not blocked (episodes end at the newline, "
        f"EOS or the episode limit). Medians over {st['reps']} repetitions after a warm-up; the arms alternate within "
        "each repetition. Speed-up: the other arm's seconds over cached's, per repetition, median.",
        "",
        f"| engine | s / 1k trials | sampled tok/s | episodes / trial (with the answer) | trials with all {b['max_episodes']} "
        "episodes + answer | forced-answer rate | sampled tokens / trial | cached speed-up |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for a in ENGINE_ARMS:
        r = arms[a]
        speed = "1 (reference)" if a == "cached" else f"{r['cached_speedup']:.2f}x"
        every = f"{r['all_episodes_rate']:.0%}" if "all_episodes_rate" in r else "n/a"
        lines.append(
            f"| {a} | {r['s_per_1k_trials']:.2f} | {r['tokens_per_s']:,.0f} | {r['episodes_per_trial']:.2f} | {every} | "
            f"{r['forced_answer_rate']:.2f} | {r['sampled_tokens_per_trial']:.1f} | {speed} |"
        )
    lines += [
        "",
        "A trial ends early when the policy emits EOS without an answer (the environment then forces "
        "the answer at once): EOS is 1 of the untrained model's 100 tokens, so not every trial reaches the "
        "last episode; an episode also ends at a newline before its token limit.",
    ]
    mp = section["meta_prover"]
    lines += [
        "",
        f"cached == reencode tokens (same keys): {'yes' if section['cached_equals_reencode_tokens'] else 'NO'} "
        f"(every repetition: {section['cached_equals_reencode_per_rep']}); hf_generate samples with its own generator, "
        "so its tokens differ (same budget, same distribution).",
        "",
        f"Meta-prover ({st['meta_prover_samples']} forced answers at every episode boundary, "
        f"{section['meta_prover_rows']:.0f} answers per repetition): continuing from the kept caches "
        f"{mp['meta_prover_cached']['median_s']:.2f} s, re-encoding every prefix {mp['meta_prover_reencode']['median_s']:.2f} s: "
        f"**{section['meta_prover_speedup']:.2f}x** (per repetition: "
        + ", ".join(f"{x:.2f}" for x in section["meta_prover_speedup_per_rep"])
        + ").",
    ]
    return "\n".join(lines) + "\n"


SECTIONS = {"trl": bench_trl, "engine": bench_engine}
TABLES = {"trl": table_trl, "engine": table_engine}
SECTION_TITLES = {
    "trl": "Trainer iteration: metarl-llm (PPO, GRPO) vs trl GRPOTrainer",
    "engine": "Rollout engines on multi-episode trials: cached vs re-encoding",
}


# ------------------------------------------------------------------------------ main


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default="trl,engine", help=f"comma-separated sections to run, of {sorted(SECTIONS)}")
    p.add_argument("--reps", type=int, default=3, help="repetitions (arms alternate within each)")
    p.add_argument("--steps", type=int, default=4, help="measured iterations per run")
    p.add_argument("--warmup", type=int, default=1, help="iterations per run excluded from the figures")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (set OMP_NUM_THREADS to match)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where both trainers run")
    p.add_argument(
        "--bf16",
        action="store_true",
        help="bf16 autocast on both sides (ours model.autocast=bf16 with algo.old_logprobs=recompute, trl bf16=True); "
        "the matmul peak is then measured in bf16",
    )
    p.add_argument(
        "--cudnn-attention",
        action="store_true",
        help="allow PyTorch's cuDNN attention backend (CUDA; both sides): it plans every new shape, ~40 ms",
    )
    p.add_argument("--problems", type=int, default=8, help="problems per iteration")
    p.add_argument("--group", type=int, default=8, help="trials per problem (trl num_generations)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arms", nargs="+", default=list(ARM_ORDER), choices=list(ARM_ORDER), help="trl section: arms to run")
    p.add_argument("--allow-stops", action="store_true", help="do not block newline/EOS (lengths then differ by side)")
    p.add_argument("--engine-trials", type=int, default=64, help="engine section: trials per run")
    p.add_argument("--engine-episodes", type=int, default=4, help="engine section: budget.max_episodes")
    p.add_argument("--engine-reps", type=int, default=3, help="engine section: measured repetitions (after one warm-up)")
    p.add_argument(
        "--engine-overrides",
        nargs="*",
        default=[],
        help="engine section: Hydra overrides (the positional ones are the trl section's)",
    )
    p.add_argument("--matmul-size", type=int, default=1024)
    p.add_argument("--matmul-reps", type=int, default=9)
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke configuration: 2 problems x 2 trials, 8 + 4 tokens, 1 rep, 1 measured step after 1 warm-up; "
        "engine: 4 trials of 2 episodes, 1 rep",
    )
    p.add_argument("--results-dir", default=str(ROOT / "bench" / "results"))
    p.add_argument("--name", default="throughput", help="results files: <name>.json and <name>_table.md")
    p.add_argument("--out-root", default=None, help="run directories (default: a temporary directory, removed after)")
    p.add_argument("--render-only", action="store_true", help="rewrite <name>_table.md from <name>.json; run nothing")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for our trainer (and the shared settings trl reads)")
    args = p.parse_intermixed_args(argv)
    if args.quick:
        args.problems, args.group, args.reps, args.steps, args.warmup = 2, 2, 1, 1, 1
        args.matmul_size, args.matmul_reps = 256, 3
        args.engine_trials, args.engine_episodes, args.engine_reps = 4, 2, 1
    sections = [s for s in args.sections.split(",") if s]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        p.error(f"--sections: unknown {unknown}; choose from {sorted(SECTIONS)}")
    if min(args.reps, args.steps, args.problems) < 1 or args.group < 2 or args.warmup < 0:
        p.error("--reps, --steps, --problems must be >= 1, --group >= 2, --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    if min(args.engine_trials, args.engine_episodes, args.engine_reps) < 1:
        p.error("--engine-trials, --engine-episodes, --engine-reps must be >= 1")
    return args, sections


def main(argv=None) -> dict:
    args, sections = parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    torch.set_num_threads(args.threads)
    from metarl_llm.models import set_cudnn_attention

    set_cudnn_attention(args.cudnn_attention)  # process-wide: trl's runs and the engine section too
    logging.basicConfig(level=logging.WARNING)
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{args.name}.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results.setdefault("sections", {})
    if args.render_only:
        table = render(results)
        (results_dir / f"{args.name}_table.md").write_text(table)
        return results
    tmp = None
    if args.out_root is None:
        tmp = tempfile.mkdtemp(prefix="bench_throughput_")
        args.out_root = tmp
    try:
        peak = matmul_flops_per_s(
            args.matmul_size, args.matmul_reps, args.threads, args.device, torch.bfloat16 if args.bf16 else torch.float32
        )
        print(
            f"matmul {peak['dtype']} {args.matmul_size}^2 on {args.device}, {args.threads} thread(s): "
            f"{peak['flops_per_s'] / 1e9:.1f} GFLOP/s",
            flush=True,
        )
        for name in sections:
            t0 = time.perf_counter()
            section = SECTIONS[name](args, list(args.overrides), peak["flops_per_s"])
            section["matmul"] = peak
            section["environment"] = environment_info(args.threads, args.device)
            section["command"] = " ".join(["python bench/throughput.py", *(sys.argv[1:] if argv is None else argv)])
            section["quick"] = args.quick
            section["wall_s"] = time.perf_counter() - t0
            section["loadavg_after"] = list(os.getloadavg())  # 1, 5, 15 min: how shared the machine was
            results["sections"][name] = section
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    path.write_text(json.dumps(results, indent=1, sort_keys=True, default=float) + "\n")
    table = render(results)
    (results_dir / f"{args.name}_table.md").write_text(table)
    print(table)
    return results


def render(results: dict) -> str:
    """The Markdown tables of every known section in ``results`` (the JSON's content)."""
    table = ["# Throughput benchmark (bench/throughput.py)", ""]
    names = [n for n in SECTIONS if n in results["sections"]]  # in the script's order, whatever the JSON's
    for name in names:
        section = results["sections"][name]
        m, env = section["matmul"], section["environment"]
        gpu = f"{env['gpu']} (CUDA {env['cuda']}), " if env.get("device") == "cuda" else ""
        table += [
            f"## {SECTION_TITLES.get(name, name)}",
            "",
            f"    {section['command']}",
            "",
            f"Machine: {gpu}{env['cpu_count']} CPUs, torch {env['torch']}, "
            f"transformers {env['transformers']}, trl {env['trl']}, "
            f"{env['torch_threads']} torch thread(s); {m.get('dtype', 'float32')} matmul peak "
            f"{m['flops_per_s'] / 1e9:.1f} GFLOP/s on {m.get('device', 'cpu')} "
            f"({m['n']}x{m['n']}, median of {len(m['seconds'])}).",
            "",
            TABLES[name](section),
        ]
    return "\n".join(table)


if __name__ == "__main__":
    main()
