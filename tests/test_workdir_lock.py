"""One owner per work directory (memnas_jax.workdir_lock): a second search is refused at once,
naming the holder; a killed holder leaves no stale lock."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
from test_search import ScriptedTrainer, _config  # tests/ is on sys.path (rootdir conftest)

from memnas_jax import search
from memnas_jax.errors import EXIT_USER_ERROR
from memnas_jax.workdir_lock import WorkdirLock, WorkdirLockedError

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
_HOLD = """
import sys, time
from memnas_jax.workdir_lock import WorkdirLock
with WorkdirLock(sys.argv[1], "search"):
    print("locked", flush=True)
    time.sleep(600)
"""


def _holder(workdir):
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(workdir)], stdout=subprocess.PIPE,
                            text=True, env=dict(os.environ))
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_search_is_refused_and_a_killed_holder_leaves_no_lock(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    holder = _holder(workdir)
    try:
        start = time.perf_counter()
        with pytest.raises(WorkdirLockedError, match=f"PID {holder.pid}, started") as err:
            search.run_search(_config(), workdir, train_fn=ScriptedTrainer())
        assert time.perf_counter() - start < 5  # at once, not after a wait
        assert "another search: host " in str(err.value) and "--workdir" in str(err.value)
        # Through the main: one line, exit status 2.
        proc = subprocess.run(
            [sys.executable, str(REPO_ROOT / "experiments" / "cifar10_search.py"),
             f"--config={REPO_ROOT / 'experiments' / 'configs' / 'cifar10.py'}:test",
             f"--workdir={workdir}"], capture_output=True, text=True, timeout=300,
            env=dict(os.environ), check=False)
        assert proc.returncode == EXIT_USER_ERROR and "Traceback" not in proc.stderr
        assert "is in use by another search: host" in proc.stderr
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The kernel dropped the dead holder's lock: the search runs, and then releases it.
    result = search.run_search(_config(max_rounds=1), workdir, train_fn=ScriptedTrainer())
    assert result.finished
    with WorkdirLock(workdir):
        pass
