"""IdHashes: rows sharing an id hash, found the same in memory and from scratch partitions."""

from __future__ import annotations

import numpy as np
import pandas as pd

from pertscale.store.unique import IdHashes


def _hashes(ids: list[str]) -> np.ndarray:
    return pd.util.hash_array(np.array(ids, dtype=object))


def test_spilled_partitions_find_the_same_rows_as_memory(tmp_path):
    ids = [f"cell{i}" for i in range(5000)]
    for a, b in [(10, 4990), (2500, 2501), (7, 3333)]:  # across blocks and partitions
        ids[b] = ids[a]
    blocks = [ids[i:i + 613] for i in range(0, len(ids), 613)]
    found = {}
    for memory in (10**9, 1000):
        h = IdHashes(tmp_path / f"scratch{memory}", memory_hashes=memory)
        for block in blocks:
            h.add(_hashes(block))
        found[memory] = h.shared_rows()
        assert (tmp_path / f"scratch{memory}").exists() == (memory == 1000)
        h.close()
        assert not (tmp_path / f"scratch{memory}").exists()
    np.testing.assert_array_equal(found[1000], found[10**9])
    np.testing.assert_array_equal(found[1000], [7, 10, 2500, 2501, 3333, 4990])


def test_unique_ids_share_no_rows(tmp_path):
    h = IdHashes(tmp_path / "s", memory_hashes=100)
    for start in range(0, 1000, 128):
        h.add(_hashes([f"c{i}" for i in range(start, min(start + 128, 1000))]))
    assert h.shared_rows().size == 0
    h.close()
