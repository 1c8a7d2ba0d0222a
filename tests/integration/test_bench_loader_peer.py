"""`pertscale bench loader --peer annbatch`: both loaders on the same cells, annbatch over its
own pre-shuffled collection of the source, randomness counted against the source order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
PEER_PYTHON = REPO / ".venv-annbatch" / "bin" / "python"


@pytest.mark.skipif(not PEER_PYTHON.is_file(),
                    reason="annbatch venv absent: PYENV_VERSION=3.12.1 python3.12 -m venv "
                           ".venv-annbatch && .venv-annbatch/bin/pip install annbatch==0.3.1")
def test_both_loaders_are_compared_at_their_source_order_randomness(tmp_path, capsys):
    from pertscale.bench import main as bench_main

    out = tmp_path / "loader.json"
    code = bench_main(["loader", "--n-cells", "6000", "--n-genes", "500", "--nnz-per-cell", "40",
                       "--batch-size", "256", "--grid", "64x16,256x4", "--repeats", "1",
                       "--peer", "annbatch", "--peer-python", str(PEER_PYTHON),
                       "--work-dir", str(tmp_path), "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    peer, ours = result["peer"], result["loader"]
    assert peer["cells"] == ours[0]["cells"] == 6000 // 256 * 256
    # both shuffle the sorted source: batches hold the labels a random batch would
    for row in (*ours, peer):
        assert row["labels_ratio"] > 0.95, row
    same = result["vs_peer"]["same_setting"]
    assert same["setting"] == "64x16"
    assert same["ratio"] == pytest.approx(ours[0]["cells_per_s"] / peer["cells_per_s"])
    # annbatch also reads our store's own files (format v2 is an AnnData zarr store), with
    # batches as random as on its own collection
    on_ours = result["peer_on_our_store"]
    assert on_ours["cells"] == peer["cells"]
    assert on_ours["labels_ratio"] > 0.95
    assert result["vs_peer_on_our_store"]["ratio"] == pytest.approx(
        ours[0]["cells_per_s"] / on_ours["cells_per_s"])
    table = capsys.readouterr().out
    assert "annbatch 64x16" in table and "source blk" in table
    assert "annbatch on our store" in table
