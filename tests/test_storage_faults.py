"""Storage faults (memnas_jax.io): a write that fails at any of the search's write sites stops the
search with one message naming the path, leaves the previous state intact, and the same command
then resumes to the uninterrupted result; a plot that fails is skipped."""

import errno
import logging
import os

import pytest
from test_search import ScriptedTrainer, _config, _without_timing  # tests/ is on sys.path

from memnas_jax import io as io_lib
from memnas_jax import search
from memnas_jax.search import reports

_real_write = io_lib._write


def _failing_write(name: str, after: int, error: int):
    """io._write that fails with `error` on the `after`-th write of a file called `name`."""
    seen = {"count": 0}

    def write(path, data, previous):
        if path.name == name:
            seen["count"] += 1
            if seen["count"] == after:
                raise OSError(error, os.strerror(error), str(path))
        return _real_write(path, data, previous)
    return write


@pytest.mark.parametrize("name, error", [
    (search.STATE_FILE, errno.ENOSPC), (reports.CANDIDATES_FILE, errno.EROFS),
    (reports.LEADERBOARD_FILE, errno.EIO), (search.CONFIG_FILE, errno.ENOSPC)])
def test_a_failed_write_stops_cleanly_and_the_search_resumes(name, error, tmp_path,
                                                              monkeypatch):
    config = _config(max_rounds=2, stop_when_no_improvement=False)
    search.run_search(config, tmp_path / "whole", train_fn=ScriptedTrainer())
    workdir = tmp_path / "faulty"
    after = 1 if name == search.CONFIG_FILE else 3
    monkeypatch.setattr(io_lib, "_write", _failing_write(name, after, error))
    with pytest.raises(io_lib.StorageError) as err:
        search.run_search(config, workdir, train_fn=ScriptedTrainer())
    message = str(err.value)
    assert f"cannot write {workdir / name}" in message and "previous copy is intact" in message
    if name != search.CONFIG_FILE:
        assert search.load_state(workdir) is not None  # the last good state is readable
    assert not list(workdir.glob(".*.tmp"))  # no temp file left behind
    monkeypatch.setattr(io_lib, "_write", _real_write)
    resumed = search.run_search(config, workdir, train_fn=ScriptedTrainer())
    assert resumed.finished
    assert (_without_timing(reports.read_candidates(workdir))
            == _without_timing(reports.read_candidates(tmp_path / "whole")))


def test_a_plot_that_fails_is_skipped(tmp_path, monkeypatch, caplog):
    config = _config(max_rounds=2)
    config.output.update(dict(plots=True, tensorboard=False))

    def broken(*args, **kwargs):
        raise RuntimeError("no font for this glyph")
    monkeypatch.setattr(reports, "plot_pareto", broken)
    with caplog.at_level(logging.WARNING):
        result = search.run_search(config, tmp_path, train_fn=ScriptedTrainer())
    assert result.finished and not (tmp_path / reports.PARETO_FILE).exists()
    assert (tmp_path / reports.TRAJECTORY_FILE).exists()
    assert "no font for this glyph" in caplog.text and "the search goes on" in caplog.text
