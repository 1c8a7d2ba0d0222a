"""`pertscale bench <name>`: benchmark commands. Each prints a table and writes JSON."""

from __future__ import annotations

import sys

BENCHES: dict[str, str] = {
    "ingest": "pertscale.bench.ingest:main",
    "loader": "pertscale.bench.loader:main",
    "train": "pertscale.bench.train:main",
    "gears": "pertscale.bench.finetune:main",
    "scgen": "pertscale.bench.scgen_kang:main",  # NOTE: not bench/scgen.py: the peer script beside it imports the package scgen
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: pertscale bench {{{','.join(BENCHES)}}} [args]")
        return 0
    name = argv[0]
    if name not in BENCHES:
        print(f"pertscale bench: unknown benchmark {name!r}; choices: {sorted(BENCHES)}",
              file=sys.stderr)
        return 2
    from pertscale.cli import resolve

    return int(resolve(BENCHES[name])(argv[1:]) or 0)
