"""Graceful preemption (memnas_jax.preemption): SIGTERM stops a real search after the current
step with exit status 75 and the resume command; the resumed search gives the uninterrupted
records. A second Ctrl-C exits at once; a stop that overruns the grace period is cut short."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
from test_experiments import CIFAR_CONFIG, _without_timing  # tests/ is on sys.path

from memnas_jax import preemption
from memnas_jax.search import reports

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _argv(workdir, cache, checkpoints):
    return [sys.executable, str(REPO_ROOT / "experiments" / "cifar10_search.py"),
            f"--config={CIFAR_CONFIG}:test", f"--workdir={workdir}",
            "--config.search.max_rounds=1", "--config.output.progress_bar=false",
            "--config.train.epochs=30",  # the signal lands inside the second candidate
            f"--config.search.candidate_checkpoints={checkpoints}",
            "--config.train.checkpoint_every_epochs=10",
            f"--config.train.compilation_cache_dir={cache}"]


@pytest.mark.parametrize("checkpoints", [False, True])
def test_sigterm_stops_after_a_step_and_the_search_resumes_exactly(checkpoints, tmp_path):
    """Without candidate checkpoints the candidate in flight trains again; with them it goes on
    from the step it stopped at (a mid-epoch snapshot). Either way: the uninterrupted records."""
    env = dict(os.environ)
    cache = tmp_path / "cache"
    subprocess.run(_argv(tmp_path / "whole", cache, checkpoints), env=env, check=True,
                   capture_output=True, timeout=600)
    proc = subprocess.Popen(_argv(tmp_path / "stopped", cache, checkpoints), env=env,
                            stderr=subprocess.PIPE, text=True)
    lines, epochs = [], 0
    for line in proc.stderr:  # the second candidate's first epoch: stop it mid-candidate
        lines.append(line)
        epochs += "epoch 1/30" in line
        if epochs == 2:
            proc.send_signal(signal.SIGTERM)
            start = time.perf_counter()
            break
    _, rest = proc.communicate(timeout=120)
    log = "".join(lines) + rest
    assert proc.returncode == preemption.EXIT_PREEMPTED, log[-3000:]
    assert time.perf_counter() - start < preemption.DEFAULT_GRACE_SECONDS
    assert "SIGTERM received: stopping after the current training step" in log
    assert "Resume it with the same command" in log and "Traceback" not in log
    records = reports.read_candidates(tmp_path / "stopped")
    assert len(records) == 1  # the candidate in flight stays pending
    snapshots = list((tmp_path / "stopped").glob("candidate_checkpoints/*/preempted"))
    assert len(snapshots) == int(checkpoints)
    subprocess.run(_argv(tmp_path / "stopped", cache, checkpoints), env=env, check=True,
                   capture_output=True, timeout=600)
    resumed = [r for r in reports.read_candidates(tmp_path / "stopped")
               if "(stopped on request)" in r["message"]]
    assert len(resumed) == int(checkpoints)  # the candidate in flight resumed mid-epoch
    # Same records, the resumed candidate's note on where it resumed aside.
    strip = lambda records: [{k: v for k, v in r.items() if k != "message"}  # noqa: E731
                             for r in _without_timing(records)]
    assert (strip(reports.read_candidates(tmp_path / "stopped"))
            == strip(reports.read_candidates(tmp_path / "whole")))


def test_second_ctrl_c_exits_at_once_and_the_grace_period_is_enforced(monkeypatch):
    exits = []
    monkeypatch.setattr(preemption.os, "_exit", exits.append)
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        preemption.reset()
        preemption.install(grace_seconds=0.2)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # the handler runs in this (main) thread
        assert preemption.requested() and exits == []
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert exits == [128 + signal.SIGINT]
        time.sleep(0.5)  # the grace deadline of the first request
        assert exits[-1] == preemption.EXIT_PREEMPTED
    finally:
        preemption.reset()
        for s, handler in previous.items():
            signal.signal(s, handler)
