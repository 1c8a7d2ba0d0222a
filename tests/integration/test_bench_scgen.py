"""`pertscale bench scgen`: ours beside the reference scgen 2.1.0 on the same Kang cells, genes
and held-out type, in one run; the JSON's numbers are the metrics of the predictions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
PEER_PYTHON = REPO / ".venv-scgen" / "bin" / "python"


def test_missing_peer_python_is_named(tmp_path):
    from pertscale.bench.scgen_kang import main

    h5ad = tmp_path / "cells.h5ad"
    h5ad.touch()  # a stand-in, so the peer's python is the one missing path
    with pytest.raises(FileNotFoundError, match="nope/python"):
        main(["--peer-python", str(tmp_path / "nope" / "python"), "--work", str(tmp_path),
              "--h5ad", str(h5ad)])


@pytest.mark.skipif(not PEER_PYTHON.is_file(),
                    reason="reference venv absent: make .venv-scgen/.installed")
def test_bench_scores_both_sides_on_the_held_out_type(shared_data, tmp_path, monkeypatch,
                                                      capsys):
    import ray

    from pertscale.bench.scgen_kang import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "scgen.json"
    try:
        assert main(["--peer-python", str(PEER_PYTHON), "--types", "CD4 T cells",
                     "--epochs", "2", "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    finally:
        ray.shutdown()
    (row,) = json.loads(out.read_text())["rows"]
    assert row["heldout"] == "CD4 T cells" and row["n_de_genes"] == 100
    assert row["reference_versions"]["scgen"] == "2.1.0"
    for model in ("scgen", "reference", "no_change", "matching_mean"):
        assert 0 <= row[model]["r2_de"] <= 1 and 0 <= row[model]["r2_all"] <= 1
    # the no-change R^2 is the squared correlation of control and stimulated means (by hand)
    import anndata as ad

    cells = ad.read_h5ad(tmp_path / "work" / "peer_cells.h5ad")
    in_type = (cells.obs["cell_type"] == "CD4 T cells").to_numpy()
    x = np.asarray(cells.X.todense())
    ctrl = x[in_type & (cells.obs["condition"] == "ctrl").to_numpy()].mean(0)
    stim = x[in_type & (cells.obs["condition"] == "stim").to_numpy()].mean(0)
    assert row["no_change"]["r2_all"] == pytest.approx(np.corrcoef(ctrl, stim)[0, 1] ** 2,
                                                       rel=1e-4)
    assert "scgen 2.1.0" in capsys.readouterr().out
