"""Progress of long phases: log lines with count, rate and ETA when the output is not a terminal,
a bar when it is; the SFT fit (warm start, SFT baselines) reports its steps."""

import io
import logging

from metarl_llm.runtime.progress import Progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_log_lines_off_a_terminal(caplog):
    caplog.set_level(logging.INFO, logger="metarl_llm.progress")
    with Progress(4, "warm start", unit="step", every_s=0, stream=io.StringIO()) as p:
        for k in range(4):
            p.update(1, loss=1.0 / (k + 1))
    lines = [r.getMessage() for r in caplog.records if r.name == "metarl_llm.progress"]
    assert len(lines) == 4  # after steps 1-3 (every_s=0), then the final line at the end (none repeated)
    assert lines[0].startswith("warm start: 1/4 steps (25%), ") and "ETA " in lines[0] and lines[0].endswith("loss=1")
    assert lines[-1].startswith("warm start: 4/4 steps (100%), ") and "steps/s" in lines[-1] and lines[-1].endswith("loss=0.25")


def test_a_bar_on_a_terminal_and_no_log_lines(caplog):
    caplog.set_level(logging.INFO, logger="metarl_llm.progress")
    out = Terminal()
    with Progress(3, "verifier training", every_s=0, stream=out) as p:
        p.update(3, loss=0.5)
    assert "verifier training" in out.getvalue() and "3/3" in out.getvalue()
    assert not [r for r in caplog.records if r.name == "metarl_llm.progress"]


def test_the_sft_fit_reports_its_steps(caplog):
    from metarl_llm.config import TinyModelConfig
    from metarl_llm.models import build_char_tokenizer, build_tiny_model
    from metarl_llm.sft.fit import fit_records

    caplog.set_level(logging.INFO, logger="metarl_llm.progress")
    tok = build_char_tokenizer()
    model = build_tiny_model(
        TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), len(tok), tok.pad_token_id, 0
    )
    ids = tok.encode("1+2\nAnswer: 3\n", add_special_tokens=False)
    records = [{"input_ids": ids, "completion_mask": [0] * 4 + [1] * (len(ids) - 4)}] * 8
    fit_records(model, tok, records, 3, 4, 1e-3, 0, desc="warm start, focused phase", progress_bar=False)
    lines = [r.getMessage() for r in caplog.records if r.name == "metarl_llm.progress"]
    assert lines and lines[-1].startswith("warm start, focused phase: 3/3 steps (100%)") and "loss=" in lines[-1]
