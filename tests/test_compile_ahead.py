"""Compile-ahead (memnas_jax.compile_ahead): the pipeline's order and depth, and a real search
whose records are the same with and without it."""

import dataclasses
import threading
import time

import pytest
from test_search import _preset  # tests/ is on sys.path (rootdir conftest)

from memnas_jax import data as data_lib
from memnas_jax import search
from memnas_jax.compile_ahead import CompileAhead, auto_depth, resolve_depth


def test_items_compile_at_most_depth_ahead_in_order():
    started, release = [], threading.Event()

    def compile_fn(item):
        started.append(item)
        release.wait(10)
        return f"programs of {item}"

    items = list("abcdef")
    with CompileAhead(compile_fn, items, depth=2) as ahead:
        time.sleep(0.2)
        assert started == ["a", "b"]  # two threads busy; "c" queued
        release.set()
        for item in items:
            assert ahead.take(item).result(10) == f"programs of {item}"
            # Never more than depth items past the one taken.
            assert len(started) <= items.index(item) + 3
    assert started == items


def test_compile_errors_reach_the_taker_and_depth_zero_compiles_nothing():
    def compile_fn(item):
        if item == 2:
            raise RuntimeError("no kernel for this fusion")
        return item

    with CompileAhead(compile_fn, [1, 2, 3], depth=1) as ahead:
        assert ahead.take(1).result() == 1
        with pytest.raises(RuntimeError, match="no kernel"):
            ahead.take(2).result()
        assert ahead.take(3).result() == 3
    with CompileAhead(compile_fn, [1, 2], depth=0) as ahead:
        assert ahead.take(1) is None
    assert auto_depth(2) == 1 and auto_depth(16) == 4 and auto_depth(64) == 4
    assert resolve_depth(0) == 0 and resolve_depth(3) == 3
    with pytest.raises(ValueError, match=">= -1"):
        resolve_depth(-2)


def _round0_config(compile_ahead: int):
    config = _preset("experiments/configs/cifar10.py", "test")
    config.search.update(dict(max_rounds=1, full_train_rounds=1, full_train_cap=3))
    config.output.update(dict(progress_bar=False, plots=False, tensorboard=False))
    config.parallel.compile_ahead = compile_ahead
    return config


_TIMING = ("train_seconds", "compile_seconds", "images_per_second")


def _records(workdir):
    state = search.load_state(workdir)
    return [{k: v for k, v in e.to_json().items() if k not in _TIMING}
            for r in state.rounds for e in r.entries]


class _FailingCompile(search.CandidateTrainer):
    """The real trainer, except that one candidate's compile fails (in its compile thread)."""

    bad_hash = None

    def compile(self, arch, skeleton):
        if arch.canonical_hash() == self.bad_hash:
            raise RuntimeError("RESOURCE_EXHAUSTED: planted compile failure")
        return super().compile(arch, skeleton)


def test_search_records_are_the_same_with_compile_ahead(tmp_path):
    """Three real candidates, trained with their programs compiled sequentially and two ahead:
    identical records (statuses, accuracies, epochs, messages) and winner. The persistent
    compilation cache fills <workdir>/xla_cache. A candidate whose compile fails in a
    compile-ahead thread is recorded as failed and the search goes on."""
    sequential = search.run_search(_round0_config(0), tmp_path / "sequential")
    ahead = search.run_search(_round0_config(2), tmp_path / "ahead")
    assert _records(tmp_path / "ahead") == _records(tmp_path / "sequential")
    assert ahead.arch_hash == sequential.arch_hash and ahead.accuracy == sequential.accuracy
    assert all(e["status"] == "ok" for e in _records(tmp_path / "ahead"))
    assert any((tmp_path / "ahead" / "xla_cache").glob("jit_step-*"))

    config = _round0_config(2)
    records = _records(tmp_path / "sequential")
    dataset = dataclasses.replace(data_lib.load_dataset(config.data), test=None)
    trainer = _FailingCompile(search.SearchSettings.from_config(config), dataset,
                              tmp_path / "failing")
    trainer.bad_hash = records[1]["hash"]
    search.run_search(config, tmp_path / "failing", train_fn=trainer)
    failing = _records(tmp_path / "failing")
    assert [r["status"] for r in failing] == ["ok", "failed", "ok"]
    assert "planted compile failure" in failing[1]["message"]
    # The round-0 rewards are relative to the median of the successful candidates: they move.
    unranked = lambda r: {k: v for k, v in r.items() if k != "reward"}  # noqa: E731
    assert unranked(failing[0]) == unranked(records[0])
    assert unranked(failing[2]) == unranked(records[2])
