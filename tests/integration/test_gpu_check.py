"""bench/gpu_check.sh, the prepared device check: its CPU dry run runs every step, writes the
table's JSON with both layouts of both configs, and a failed step makes the check fail with a
line naming it while the other steps still run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pertscale.bench.gpu_table import build_report

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu_check.sh"


def _dry_run(out: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=REPO, capture_output=True,
                          text=True, timeout=600, check=False,
                          env={**os.environ, "PYTHON": sys.executable, "OUT": str(out), **env})


def test_dry_run_exercises_every_step_and_writes_both_layouts_of_both_configs(tmp_path):
    proc = _dry_run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "gpu_check: all steps passed" in proc.stdout
    assert "FAILED" not in proc.stdout
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dry_run"] is True and report["ok"] is True and report["problems"] == []
    assert [s["name"] for s in report["steps"]] == [
        "install", "env", "gpu_tests", "bench_d64-L2", "bench_d128-L2"]
    assert all(s["status"] == "ok" for s in report["steps"])
    assert report["env"]["device_name"] == "cpu"
    assert [(r["config"], r["layout"]) for r in report["table"]] == [
        ("d64-L2", "packed"), ("d64-L2", "padded"), ("d128-L2", "packed"), ("d128-L2", "padded")]
    assert [(r["d_model"], r["n_layers"]) for r in report["table"]] == [
        (64, 2), (64, 2), (128, 2), (128, 2)]
    for r in report["table"]:
        assert r["precision"] == "fp32" and r["mfu"] is None and r["peak_mem_mb"] is None
        if r["layout"] == "padded":
            assert r["packed_over_padded"] == 1.0 and r["pad_fraction"] > 0
    for config in report["configs"]:  # the full benchmark rows travel too
        packed, padded = config["rows"]
        assert packed["real_tokens_per_step"] == padded["real_tokens_per_step"]
        assert config["config"]["device"] == "cpu" and config["config"]["peer_path"] == ""
    # the printed table: one line per (config, layout) under its header
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("config "))
    assert lines[header].split() == ["config", "layout", "real", "tokens/s", "MFU", "peak",
                                     "MB", "packed/padded"]
    assert [line.split()[:2] for line in lines[header + 1:header + 5]] == [
        ["d64-L2", "packed"], ["d64-L2", "padded"], ["d128-L2", "packed"],
        ["d128-L2", "padded"]]
    assert (tmp_path / "gpu_check.log").read_text().count("== bench_d128-L2: ok") == 1


def test_a_failed_step_fails_the_check_and_names_it_and_no_gpu_tests_is_not_a_failure(tmp_path):
    # A python that fails the first benchmark config only, and a GPU test folder without a
    # gpu test (pytest exits 5: collected nothing), which the check reports in words.
    wrapper = tmp_path / "python"
    wrapper.write_text("#!/bin/bash\n"
                       'case " $* " in *" --d_model=64 "*) echo "injected" >&2; exit 3;; esac\n'
                       f'exec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    tests = tmp_path / "gpu_tests"
    tests.mkdir()
    (tests / "test_cpu_only.py").write_text("def test_not_a_gpu_test():\n    pass\n")
    out = tmp_path / "out"
    proc = _dry_run(out, PYTHON=str(wrapper), GPU_TESTS_DIR=str(tests))
    assert proc.returncode == 1
    assert "gpu_check: FAILED: bench_d64-L2: failed (exit 3)" in proc.stdout
    assert proc.stdout.count("gpu_check: FAILED") == 1
    report = json.loads((out / "gpu_check.json").read_text())
    steps = {s["name"]: s for s in report["steps"]}
    assert steps["gpu_tests"]["status"] == "ok"
    assert steps["gpu_tests"]["detail"].startswith("no gpu tests (pytest collected none")
    assert report["gpu_tests"] == steps["gpu_tests"]["detail"]
    # the config after the failure still ran and measured both layouts
    assert [(r["config"], r["layout"]) for r in report["table"]] == [
        ("d128-L2", "packed"), ("d128-L2", "padded")]
    assert report["ok"] is False
    assert report["problems"] == ["step bench_d64-L2 failed (exit 3)"]


def _write_bench(out: Path, name: str, rows: list[dict]) -> None:
    (out / f"step_{name}.json").write_text(json.dumps({"config": {}, "rows": rows}))


def _row(layout: str, mfu: float | None, peak: float | None) -> dict:
    return {"model": "pertscale", "layout": layout, "real_tokens_per_s": 1.0e6, "mfu": mfu,
            "peak_mem_mb": peak, "speedup_vs_own_padded": 1.0, "precision": "bf16",
            "device_name": "NVIDIA H200", "d_model": 512, "n_layers": 12, "batch_size": 64,
            "pad_fraction": 0.0}


@pytest.mark.parametrize("mfu,peak,problem", [
    (0.41, 2048.0, None),
    (None, 2048.0, "config a packed: no MFU (is 'NVIDIA H200' in flops.PEAK_FLOPS?)"),
    (1.3, 2048.0, "config a packed: MFU 1.3 is outside (0, 1)"),
    (0.41, None, "config a packed: no peak memory"),
])
def test_device_rows_need_a_plausible_mfu_and_a_peak_memory(tmp_path, mfu, peak, problem):
    (tmp_path / "steps.tsv").write_text("bench_a\tok\t30\t\n")
    _write_bench(tmp_path, "a", [_row("packed", mfu, peak), _row("padded", 0.3, 4096.0)])
    report = build_report(tmp_path, ["a"], dry_run=False)
    assert report["problems"] == ([] if problem is None else [problem])
    assert report["ok"] is (problem is None)


def test_a_passed_benchmark_without_its_json_or_a_layout_is_a_problem(tmp_path):
    (tmp_path / "steps.tsv").write_text("bench_a\tok\t30\t\nbench_b\tok\t30\t\n")
    _write_bench(tmp_path, "a", [_row("packed", 0.4, 1.0)])
    report = build_report(tmp_path, ["a", "b"], dry_run=False)
    assert report["problems"] == ["config a: no padded row",
                                  "config b: its benchmark passed but wrote no step_b.json"]
