"""`pertscale bench gears`: ours beside the reference package on the same cells and split, in
one run; the table's ratio and the JSON agree with the runs they summarise."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
PEER_PYTHON = REPO / ".venv-gears" / "bin" / "python"


def test_missing_peer_python_is_named(tmp_path):
    from pertscale.bench.finetune import main

    # NOTE: stand-in inputs, so the peer's python is the one missing path (also without
    # ../shared/data)
    h5ad, go = tmp_path / "cells.h5ad", tmp_path / "go.tsv"
    h5ad.touch()
    go.touch()
    with pytest.raises(FileNotFoundError, match="nope/python"):
        main(["--peer-python", str(tmp_path / "nope" / "python"), "--work", str(tmp_path),
              "--h5ad", str(h5ad), "--go", str(go)])


@pytest.mark.skipif(not PEER_PYTHON.is_file(),
                    reason="reference venv absent: python3.11 -m venv .venv-gears && "
                           ".venv-gears/bin/pip install torch==2.13.0 cell-gears==0.1.2 "
                           "torch_geometric")
def test_bench_runs_both_sides_on_the_same_conditions(shared_data, tmp_path, monkeypatch, capsys):
    import ray

    from pertscale.bench.finetune import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "gears.json"
    try:
        assert main(["--peer-python", str(PEER_PYTHON), "--epochs", "1", "--seeds", "1",
                     "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    finally:
        ray.shutdown()  # the bench started the embedded cluster; later modules start their own
    result = json.loads(out.read_text())
    run = result["runs"][0]
    assert len(run["ours"]["epoch_train_s"]) == 1 == len(run["reference"]["epoch_train_s"])
    # scored on the unseen singles both models can represent (covariate/GENE ids)
    assert run["conditions"] and all("+" not in c.split("/")[-1] for c in run["conditions"])
    table = result["table"]["epoch_train_s"]
    assert table["speedup_best"] == pytest.approx(
        min(run["reference"]["epoch_train_s"]) / min(run["ours"]["epoch_train_s"]))
    for who in ("ours", "reference", "train_mean"):
        assert np.isfinite(run[who]["mse_de"])
    printed = capsys.readouterr().out
    assert "cell-gears 0.1.2" in printed and "epoch speed-up" in printed
