"""GeneVocab: special tokens <pad> <cls> <mask> (ids 0, 1, 2) followed by gene ids.

Gene index i of a store or collection has token id i + len(SPECIAL_TOKENS). Saved as JSON
({"special_tokens": [...], "genes": [...]}) next to models and in collections.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from pertscale.constants import SPECIAL_TOKENS

__all__ = ["GeneVocab", "union_genes"]


class GeneVocab:
    """Token ids of the special tokens and of the genes, in that order."""

    def __init__(self, genes: Iterable[str]):
        self.genes: list[str] = [str(g) for g in genes]
        self.special_tokens: tuple[str, ...] = SPECIAL_TOKENS
        tokens = list(self.special_tokens) + self.genes
        self._ids: dict[str, int] = {}
        for i, tok in enumerate(tokens):
            if tok in self._ids:
                kind = "special token" if i < len(self.special_tokens) or \
                    tok in self.special_tokens else "gene"
                raise ValueError(f"duplicate {kind} {tok!r} in gene vocabulary")
            self._ids[tok] = i

    @property
    def offset(self) -> int:
        """Token id of gene index 0."""
        return len(self.special_tokens)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, token: object) -> bool:
        return token in self._ids

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GeneVocab) and self.genes == other.genes

    def __repr__(self) -> str:
        return f"GeneVocab({len(self.genes)} genes + {len(self.special_tokens)} special tokens)"

    @property
    def tokens(self) -> list[str]:
        return list(self.special_tokens) + self.genes

    def token_id(self, token: str) -> int:
        """Id of a gene id or special token; KeyError naming the token when absent."""
        try:
            return self._ids[token]
        except KeyError:
            raise KeyError(f"{token!r} is not in the gene vocabulary ({len(self.genes)} genes)") \
                from None

    def token_ids(self, tokens: Iterable[str]) -> list[int]:
        return [self.token_id(t) for t in tokens]

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"special_tokens": list(self.special_tokens),
                                          "genes": self.genes}))

    @classmethod
    def load(cls, path: str | Path) -> GeneVocab:
        path = Path(path)
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read gene vocabulary {path}: {e}") from None
        if not isinstance(doc, dict) or "genes" not in doc:
            raise ValueError(f"gene vocabulary {path} has no 'genes' list")
        specials = tuple(doc.get("special_tokens", SPECIAL_TOKENS))
        if specials != SPECIAL_TOKENS:
            raise ValueError(f"gene vocabulary {path} has special tokens {list(specials)}, "
                             f"expected {list(SPECIAL_TOKENS)}")
        return cls(doc["genes"])


def union_genes(gene_lists: Iterable[Iterable[str]]) -> list[str]:
    """Union of gene ids in first-seen order (genes of the first list keep their positions)."""
    seen: dict[str, None] = {}
    for genes in gene_lists:
        for g in genes:
            seen.setdefault(str(g), None)
    return list(seen)
