"""bench/throughput.py: the FLOP formula, the stop-token block, and the --quick run of both
sections (trl: our PPO and GRPO iterations and trl's GRPOTrainer; engine: multi-episode
trials by the cached, hf_generate and reencode engines and the meta-prover; files written)."""

import json
import math
import sys

import pytest
import torch

from tests.support import load_script

pytestmark = [
    pytest.mark.usefixtures("one_thread"),  # tests/conftest.py
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


@pytest.fixture(scope="module")
def tp():
    yield load_script("bench/throughput.py", "bench_throughput")
    sys.modules.pop("bench_throughput", None)


def test_update_flops_by_hand(tp):
    # 6 * N * D: 1M parameters, 100 tokens
    assert tp.update_flops(1_000_000, 100) == 6.0e8
    # + 6 * layers * d_model * sum(len^2): rows of 3 and 4 tokens, 2 layers, d 8
    assert tp.update_flops(10, 7, [3, 4], n_layers=2, d_model=8) == 6 * 10 * 7 + 6 * 2 * 8 * (9 + 16)


def test_matmul_peak_is_positive(tp):
    m = tp.matmul_flops_per_s(64, 3, 1)
    assert m["flops_per_s"] > 0 and len(m["seconds"]) == 3 and m["n"] == 64


def test_blocked_stop_tokens_are_never_sampled_and_weights_stay_tied(tp):
    from metarl_llm.config import ModelConfig, TinyModelConfig
    from metarl_llm.models import load_policy

    cfg = ModelConfig(tiny=TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64))
    model, tok = load_policy(cfg, 0)
    ids = tp.stop_ids(tok)
    assert tok.eos_token_id in ids and tok.convert_tokens_to_ids("\n") in ids
    before = model(input_ids=torch.tensor([[5, 6, 7]])).logits
    tp.block_stop_tokens(model, ids)
    head = model.get_output_embeddings()
    assert head.weight is model.get_input_embeddings().weight and not head.bias.requires_grad
    assert tp.trainable_params(model) == sum(p.numel() for p in model.parameters()) - head.bias.numel()
    after = model(input_ids=torch.tensor([[5, 6, 7]])).logits
    keep = [i for i in range(after.shape[-1]) if i not in ids]
    assert torch.allclose(after[..., keep], before[..., keep])
    probs = torch.softmax(after.double(), -1)
    assert float(probs[..., ids].max()) == 0.0 and torch.isfinite(torch.log_softmax(after, -1).exp().mul(after).sum(-1)).all()


def test_quick_run_writes_results(tp, tmp_path):
    res = tmp_path / "res"
    out = tp.main(["--quick", "--results-dir", str(res), "--out-root", str(tmp_path / "runs")])
    data = json.loads((res / "throughput.json").read_text())
    assert data["sections"].keys() == out["sections"].keys() == {"trl", "engine"}  # the default sections
    sec = data["sections"]["trl"]
    assert sec["quick"] and sec["matmul"]["flops_per_s"] > 0
    for k in ("torch", "transformers", "trl", "torch_threads"):
        assert k in sec["environment"]
    st = sec["settings"]
    assert st["trials_per_step"] == 4 and st["trl_max_completion_length"] == 12 and st["stop_tokens_blocked"]
    assert set(sec["summary"]) == {"ours_ppo", "ours_grpo", "trl_grpo"}
    for arm, r in sec["summary"].items():
        for k in (
            "step_s",
            "s_per_1k_trials",
            "rollout_s",
            "update_s",
            "sampled_tok_per_s",
            "trained_tok_per_s",
            "step_tok_per_s",
            "update_flops_frac",
        ):
            assert math.isfinite(r[k]) and r[k] > 0, (arm, k)
        assert r["sampled_tokens_per_trial"] == 12  # 8 episode + 4 answer tokens on both sides
        assert r["measured_steps"] == 1
        assert len(sec["steps"][arm]) == 1 and len(sec["steps"][arm][0]) == 2  # 1 rep of warm-up + 1 step
        if arm != "trl_grpo":
            assert r["speedup_vs_trl"] > 0 and len(r["speedup_vs_trl_per_rep"]) == 1
    table = (res / "throughput_table.md").read_text()
    assert "| ours_ppo |" in table and "| trl_grpo |" in table and "python bench/throughput.py --quick" in table
    # the engine section: multi-episode trials, three engines, the meta-prover both ways
    eng = data["sections"]["engine"]
    assert eng["quick"] and eng["settings"]["trials"] == 4 and eng["settings"]["budget"]["max_episodes"] == 2
    assert eng["settings"]["budget"]["max_total_tokens"] == 2 * 8  # episodes x episode tokens: no early forcing
    assert eng["cached_equals_reencode_tokens"] is True
    assert set(eng["arms"]) == {"cached", "hf_generate", "reencode"}
    for arm, r in eng["arms"].items():
        assert len(r["seconds"]) == 1 and r["s_per_1k_trials"] > 0 and r["tokens_per_s"] > 0, arm
        assert 1 < r["episodes_per_trial"] <= 3, arm  # episodes and the forced answer
        assert 0 <= r["all_episodes_rate"] <= 1 and r["forced_answer_rate"] > 0, arm
    for k in ("speedup_vs_hf_generate", "speedup_vs_reencode", "meta_prover_speedup"):
        assert math.isfinite(eng[k]) and eng[k] > 0, k
    assert eng["meta_prover_rows"] > 0 and set(eng["meta_prover"]) == {"meta_prover_cached", "meta_prover_reencode"}
    assert "| cached |" in table and "| hf_generate |" in table and "Meta-prover" in table
    # a second section run keeps the others' entries (here: the same section, replaced)
    data["sections"]["other"] = {"kept": True}
    (res / "throughput.json").write_text(json.dumps(data))
    tp.main(
        ["--quick", "--sections", "trl", "--arms", "ours_grpo", "--results-dir", str(res), "--out-root", str(tmp_path / "runs")]
    )
    again = json.loads((res / "throughput.json").read_text())
    assert again["sections"]["other"] == {"kept": True} and set(again["sections"]["trl"]["summary"]) == {"ours_grpo"}
    assert again["sections"]["engine"] == data["sections"]["engine"]  # not run this time: kept
    (res / "throughput_table.md").unlink()
    tp.main(["--render-only", "--results-dir", str(res)])  # the table again, from the JSON alone
    rendered = (res / "throughput_table.md").read_text()
    assert "| ours_grpo |" in rendered and "| reencode |" in rendered
