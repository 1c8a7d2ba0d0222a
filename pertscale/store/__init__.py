"""Cell stores: format v1 (storage/README.md), writer, shuffled write order, tensorstore reader,
vocab, stats, verify."""

from pertscale.store.format import FORMAT_VERSION, StoreError, kvstore_spec
from pertscale.store.reader import CellStore, CsrFuture, open_store, read_store_attrs
from pertscale.store.shuffle import source_positions
from pertscale.store.vocab import GeneVocab, union_genes
from pertscale.store.writer import StoreWriter

__all__ = [
    "FORMAT_VERSION",
    "CellStore",
    "CsrFuture",
    "GeneVocab",
    "StoreError",
    "StoreWriter",
    "kvstore_spec",
    "open_store",
    "read_store_attrs",
    "source_positions",
    "union_genes",
]
