"""bench/adaptation.py's paired table: within-seed differences, paired only over the seeds both
arms ran, checked against values computed by hand."""

import pytest

from tests.support import load_script


@pytest.fixture(scope="module")
def bench():
    yield load_script("bench/adaptation.py", "bench_adaptation")


def run(start, b1, b2, b4, seq4=0.45, pass4=0.5):
    return {"success_start": start, "by_budget": {"1": b1, "2": b2, "4": b4}, "seq": {"4": seq4}, "pass": {"4": pass4}}


def test_paired_differences_by_hand(bench):
    arms = {
        "outcome": {"0": run(0.4, 0.3, 0.5, 0.6), "1": run(0.5, 0.4, 0.4, 0.7)},
        # seed 2 has no outcome run: it counts for the arm's own rows, not for "minus outcome"
        "mrt_bonus": {"0": run(0.3, 0.2, 0.4, 0.6), "1": run(0.6, 0.5, 0.6, 0.6), "2": run(0.1, 0.1, 0.2, 0.3, 0.2, 0.4)},
    }
    lines = bench.render_paired(arms, ["1", "2", "4"], ["1", "2", "4"])
    head = [c.strip() for c in lines[2].strip("|").split("|")]
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.strip("|").split("|")] for r in lines[4:]}
    col = {name: i for i, name in enumerate(head)}
    out, mrt = rows["outcome"], rows["mrt_bonus"]
    # outcome: 1x - start = -0.1 on both seeds (zero spread)
    assert out[col["1x minus start"]] == "-0.100 ± 0.000 (-0.100, -0.100)"
    # 2x - 1x = +0.2, 0.0: mean 0.1, sd sqrt(0.02), half-width t(1) * sd / sqrt(2) = 12.706 * 0.1
    assert out[col["2x minus 1x"]] == "+0.100 ± 1.271 (+0.200, +0.000)"
    # seed 1 of outcome is flat from 1x to 2x; seed 1 of mrt_bonus from 2x to 4x
    assert out[col["seeds rising at every scale"]] == "1 of 2"
    assert mrt[col["seeds rising at every scale"]] == "2 of 3"
    assert out[col["4 ep / pass@4 of 1-ep trials"]] == "0.90 ± 0.00"
    assert out[col["minus outcome at 2x"]] == ""
    # mrt_bonus - outcome at 2x over seeds 0 and 1 only: -0.1, +0.2 -> mean 0.05, half-width 12.706 * 0.15
    assert mrt[col["minus outcome at 2x"]] == "+0.050 ± 1.906 (-0.100, +0.200)"
    # the arm's own rows use its three seeds: 4x - 1x = +0.4, +0.1, +0.2
    assert mrt[col["4x minus 1x"]].endswith("(+0.400, +0.100, +0.200)")


def test_one_seed_shows_the_difference_alone(bench):
    arms = {"outcome": {"0": run(0.4, 0.3, 0.5, 0.6)}, "mrt_bonus": {"0": run(0.3, 0.2, 0.4, 0.7)}}
    lines = bench.render_paired(arms, ["1", "2", "4"], ["1", "2", "4"])
    mrt = [c.strip() for c in lines[5].strip("|").split("|")]
    assert mrt[1:4] == ["-0.100", "+0.200", "+0.500"]
    assert mrt[-3:] == ["-0.100", "-0.100", "+0.100"]
