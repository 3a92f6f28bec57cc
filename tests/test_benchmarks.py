"""The benchmarks run, at CI size, and print what later work reads: the `RESULT {json}` line."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_search_throughput_prints_its_table_and_result_line():
    """Three round-0 candidates of the test preset, one epoch, in the three modes."""
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "search_throughput.py"),
         "--preset", "test", "--candidates", "3", "--epochs", "1"],
        capture_output=True, text=True, timeout=600, cwd=REPO_ROOT,
        env=dict(os.environ), check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| # | candidate | cells | compile s |" in proc.stdout
    for mode in ("sequential", "ahead", "warm"):
        assert f"## {mode} (cpu" in proc.stdout
    result = json.loads(proc.stdout.splitlines()[-1].removeprefix("RESULT "))
    assert result["backend"] == "cpu" and result["candidates"] == 3
    for field in ("wall_s", "candidates_per_hour", "compile_s", "train_s"):
        assert result[field] > 0
    assert 0 < result["overhead_share"] < 1
    assert result["candidates_per_hour"] == pytest.approx(3 * 3600 / result["wall_s"])
    assert result["reference"]["mode"] == "sequential" and result["speedup"] > 0
    # The warm cache (a resumed search) compiles less than the sequential reference.
    assert result["compile_s"] < result["reference"]["compile_s"]


@pytest.mark.slow
def test_search_throughput_packed_mode():
    """`--packing 3`: the round-0 template compiled once, three candidates in one pack."""
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "search_throughput.py"),
         "--preset", "test", "--candidates", "3", "--epochs", "1", "--modes", "ahead",
         "--packing", "3"],
        capture_output=True, text=True, timeout=600, cwd=REPO_ROOT,
        env=dict(os.environ), check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "## packed (cpu" in proc.stdout
    result = json.loads(proc.stdout.splitlines()[-1].removeprefix("RESULT "))
    assert result["mode"] == "packed" and result["candidates"] == 3
    assert result["reference"]["mode"] == "ahead"
    assert result["images_per_s"] > 0 and result["peak_fraction"] > 0
