"""The benchmarks run, at CI size, and print what later work reads: the `RESULT {json}` line.

`benchmarks/gpu_session.sh --dry-run` runs every part of the prepared GPU window at toy size on
a CPU: search_throughput.py (ahead, warm and tuned modes; packed), the tests part and
determinism.py."""

import json
import os
import pathlib
import subprocess

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _result(log: pathlib.Path) -> dict:
    lines = [x for x in log.read_text().splitlines() if x.startswith("RESULT ")]
    assert lines, log.read_text()[-3000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_gpu_session_dry_run_brings_every_part_back(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(REPO_ROOT / "benchmarks" / "gpu_session.sh"), "--dry-run"],
                          capture_output=True, text=True, timeout=540, cwd=REPO_ROOT,
                          env=dict(os.environ, OUT=str(out)), check=False)
    summary = (out / "summary.txt").read_text()
    assert proc.returncode == 0, summary + proc.stderr[-2000:]
    for part in ("versions", "round0", "packed", "tests", "determinism"):
        assert f"{part}: exit 0 in" in summary, summary
        assert (out / f"{part}.log").is_file()

    round0 = _result(out / "round0.log")
    assert round0["backend"] == "cpu" and round0["candidates"] == 2
    assert set(round0["modes"]) == {"ahead", "warm", "tuned"}
    assert round0["reference"]["mode"] == "ahead" and round0["mode"] == "tuned"
    assert round0["candidates_per_hour"] == pytest.approx(2 * 3600 / round0["wall_s"])
    assert 0 < round0["overhead_share"] < 1
    # A warm cache (a resumed search) compiles less than a cold one; on a CPU nothing is
    # autotuned, so "tuned" starts from an empty cache like "ahead".
    assert round0["modes"]["warm"]["compile_s"] < round0["modes"]["ahead"]["compile_s"]
    assert round0["autotune_cache_files"] == 0
    # every candidate's row was streamed as it ended (what a timeout leaves behind)
    rows = [json.loads(x[4:]) for x in (out / "round0.log").read_text().splitlines()
            if x.startswith("ROW ")]
    assert [r["mode"] for r in rows] == ["ahead"] * 2 + ["warm"] * 2 + ["tuned"] * 2

    packed = _result(out / "packed.log")
    assert packed["mode"] == "packed" and packed["candidates"] == 2
    assert packed["images_per_s"] > 0 and packed["peak_fraction"] > 0

    assert "2 passed" in (out / "tests.log").read_text()
    determinism = _result(out / "determinism.log")
    assert [r["identical"] for r in determinism["rows"]] == [True]
