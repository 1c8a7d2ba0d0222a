"""Train-step benchmark: same cells for every contender, honest token accounting."""

from __future__ import annotations

from pathlib import Path

import pytest

from pertscale.bench.step import (
    StepBenchConfig,
    format_rows,
    load_scgpt_peer,
    run_step_bench,
)

PEER = Path("/tmp/scgpt_peer")
TINY = {"flavor": "debug", "batch_size": 3, "max_seq_len": 64, "median_genes": 30,
        "sigma": 0.8, "n_genes": 300, "steps": 1, "warmup": 0, "threads": 2}


def _check_rows(rows):
    packed = next(r for r in rows if r["layout"] == "packed")
    padded = next(r for r in rows if r["layout"] == "padded" and r["model"] == "pertscale")
    assert packed["real_tokens_per_step"] == padded["real_tokens_per_step"]
    assert packed["computed_tokens_per_step"] == packed["real_tokens_per_step"]
    assert padded["computed_tokens_per_step"] >= padded["real_tokens_per_step"]
    expected_pad = 1 - padded["real_tokens_per_step"] / padded["computed_tokens_per_step"]
    assert padded["pad_fraction"] == pytest.approx(expected_pad, abs=1e-3)
    assert packed["padded_over_real_tokens"] == pytest.approx(
        padded["computed_tokens_per_step"] / packed["real_tokens_per_step"], rel=1e-3)
    assert padded["cpu_speedup_vs_own_padded"] == 1.0
    for r in rows:
        assert r["real_tokens_per_s"] == pytest.approx(
            r["real_tokens_per_step"] / r["step_s_median"], rel=1e-2)
    assert "real_tokens_per_s" in format_rows(rows)


def test_step_bench_ours_only():
    rows = run_step_bench(StepBenchConfig(**TINY, peer_path=""))
    assert [(r["model"], r["layout"]) for r in rows] == [("pertscale", "packed"),
                                                         ("pertscale", "padded")]
    _check_rows(rows)


@pytest.mark.skipif(not (PEER / "scgpt" / "model" / "model.py").is_file(),
                    reason="scGPT peer not installed (pip install --no-deps --target "
                           "/tmp/scgpt_peer scgpt==0.2.4)")
def test_step_bench_with_scgpt_peer():
    rows = run_step_bench(StepBenchConfig(**TINY, peer_path=str(PEER)))
    peer = rows[-1]
    assert peer["model"] == "scgpt-0.2.4" and peer["speedup_vs_scgpt"] == 1.0
    _check_rows(rows)


def test_missing_peer_names_the_install_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="pip install --no-deps"):
        load_scgpt_peer(tmp_path)
