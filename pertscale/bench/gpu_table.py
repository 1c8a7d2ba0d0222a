"""The table and JSON of `bench/gpu_check.sh`, the prepared device check of the GPU path.

    python -m pertscale.bench.gpu_table --out DIR --configs NAME[,NAME...] [--dry-run]

Reads what the script's steps left in DIR: `steps.tsv` (one line per step: name, status,
seconds, detail), `env.json` (python, torch, device) and `step_<config>.json` per benchmark
config (`pertscale bench train --mode step`). Prints one table (config, layout, real tokens/s,
MFU, peak memory, packed/padded) under a header of the device and the GPU tests' outcome,
and writes DIR/gpu_check.json. Exits 1 when a config whose benchmark step passed lacks its
packed or padded row, or (on the device) a row has no MFU, an MFU outside (0, 1) or no peak
memory.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["LAYOUTS", "build_report", "format_report", "main"]

LAYOUTS = ("packed", "padded")
COLUMNS = (("config", "config"), ("layout", "layout"), ("real tokens/s", "real_tokens_per_s"),
           ("MFU", "mfu"), ("peak MB", "peak_mem_mb"), ("packed/padded", "packed_over_padded"))


def _read_steps(path: Path) -> list[dict[str, Any]]:
    steps = []
    if path.is_file():
        for line in path.read_text().splitlines():
            name, status, seconds, detail = (line.split("\t") + ["", "", ""])[:4]
            steps.append({"name": name, "status": status,
                          "seconds": int(seconds) if seconds.isdigit() else None,
                          "detail": detail})
    return steps


def _device_row_problems(name: str, row: dict[str, Any]) -> list[str]:
    """What a GPU row must have: an MFU inside (0, 1) and a peak memory."""
    where = f"config {name} {row['layout']}"
    if row["mfu"] is None:
        return [f"{where}: no MFU (is {row['device_name']!r} in flops.PEAK_FLOPS?)"]
    out = [] if 0 < row["mfu"] < 1 else [f"{where}: MFU {row['mfu']} is outside (0, 1)"]
    if row["peak_mem_mb"] is None:
        out.append(f"{where}: no peak memory")
    return out


def build_report(out_dir: Path, configs: list[str], *, dry_run: bool) -> dict[str, Any]:
    """Everything the check measured, as one JSON-ready dict; `problems` lists what is missing."""
    steps = _read_steps(out_dir / "steps.tsv")
    env_path = out_dir / "env.json"
    env = json.loads(env_path.read_text()) if env_path.is_file() else {}
    gpu_tests = next((s["detail"] for s in steps if s["name"] == "gpu_tests"), "not run")
    problems = [f"step {s['name']} {s['status']}" for s in steps if s["status"] != "ok"]
    report_configs, table = [], []
    for name in configs:
        bench = out_dir / f"step_{name}.json"
        step_ok = any(s["name"] == f"bench_{name}" and s["status"] == "ok" for s in steps)
        if not bench.is_file():
            if step_ok:
                problems.append(f"config {name}: its benchmark passed but wrote no {bench.name}")
            continue
        data = json.loads(bench.read_text())
        rows = [r for r in data["rows"] if r["model"] == "pertscale"]
        report_configs.append({"name": name, "config": data["config"], "rows": data["rows"]})
        for layout in LAYOUTS:
            row = next((r for r in rows if r["layout"] == layout), None)
            if row is None:
                problems.append(f"config {name}: no {layout} row")
                continue
            if not dry_run:
                problems += _device_row_problems(name, row)
            table.append({"config": name, "layout": layout,
                          "real_tokens_per_s": row["real_tokens_per_s"], "mfu": row["mfu"],
                          "peak_mem_mb": row["peak_mem_mb"],
                          "packed_over_padded": row["speedup_vs_own_padded"],
                          "precision": row["precision"], "device_name": row["device_name"],
                          "d_model": row["d_model"], "n_layers": row["n_layers"],
                          "batch_size": row["batch_size"], "pad_fraction": row["pad_fraction"]})
    return {"dry_run": dry_run, "env": env, "gpu_tests": gpu_tests, "steps": steps,
            "configs": report_configs, "table": table, "problems": problems,
            "ok": not problems}


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def format_report(report: dict[str, Any]) -> str:
    """The header lines and the table, as printed by the check."""
    env = report["env"]
    mode = ("DRY RUN on the CPU, tiny sizes: proves the steps run, measures nothing"
            if report["dry_run"] else "device run")
    lines = [(f"pertscale GPU check ({mode}): {env.get('device_name', '?')}, "
              f"torch {env.get('torch', '?')}, python {env.get('python', '?')}"),
             f"gpu tests: {report['gpu_tests']}"]
    precisions = sorted({r["precision"] for r in report["table"]})
    if precisions:
        lines.append(f"precision: {', '.join(precisions)}; packed = varlen attention, "
                     f"padded = sdpa; MFU over real tokens only")
    grid = [[title for title, _ in COLUMNS]]
    grid += [[_cell(r[key]) for _, key in COLUMNS] for r in report["table"]]
    widths = [max(len(row[i]) for row in grid) for i in range(len(COLUMNS))]
    lines += ["  ".join(v.ljust(w) if i < 2 else v.rjust(w)
                        for i, (v, w) in enumerate(zip(row, widths))) for row in grid]
    lines.append("steps: " + ", ".join(
        f"{s['name']} {s['status']}" + (f" ({s['seconds']} s)" if s["seconds"] is not None
                                        else "") for s in report["steps"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pertscale.bench.gpu_table",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="the check's output folder")
    parser.add_argument("--configs", required=True, help="benchmark config names, comma-separated")
    parser.add_argument("--dry-run", action="store_true", help="the CPU dry run's results")
    args = parser.parse_args(argv)
    report = build_report(args.out, [c for c in args.configs.split(",") if c],
                          dry_run=args.dry_run)
    print(format_report(report))
    path = args.out / "gpu_check.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")
    for problem in report["problems"]:
        if not problem.startswith("step "):  # failed steps: the script names them itself
            print(f"gpu_check: {problem}", file=sys.stderr)
    return 0 if all(p.startswith("step ") for p in report["problems"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
