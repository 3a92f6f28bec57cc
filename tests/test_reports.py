"""Search reports: records, Pareto front, markdown, plots and TensorBoard events from a state."""

import dataclasses
import json
import pathlib
import struct

import numpy as np
import pytest

from memnas_jax import search
from memnas_jax.encoding import from_json
from memnas_jax.io import atomic_write
from memnas_jax.search import reports
from memnas_jax.space import cifar_skeleton

SKELETON = cifar_skeleton(4, num_classes=4).replace(image_size=16)


def _config():
    config = search.default_config()
    config.grow_trim.update(dict(round0_combine_modes=("add",), ops=(0, 1, 6)))
    config.search.update(dict(full_train_rounds=5, full_train_cap=4))
    return config


def _state() -> search.SearchState:
    """Two rounds planned by the search code, with set results: round 0 all trained (one failed),
    round 1 half trained (still running)."""
    config = _config()
    settings = search.SearchSettings.from_config(config)
    r0 = search.plan_round(0, None, settings, SKELETON, None, None)
    for i, (status, acc) in enumerate([("ok", 0.50), ("failed", None), ("ok", 0.75),
                                       ("ok", 0.625)]):
        r0 = r0.with_entry(i, dataclasses.replace(
            r0.entries[i], status=status, accuracy=acc, train_seconds=1.5, compile_seconds=0.5,
            images_per_second=100.0, message="" if acc else "boom"))
    r0 = dataclasses.replace(search.select_winner(r0, settings), phase="done")
    r1 = search.plan_round(1, search.Base.of(r0.winner_entry, 0), settings, SKELETON, None,
                           None)
    for i, acc in enumerate((0.875, 0.5)):
        r1 = r1.with_entry(i, dataclasses.replace(
            r1.entries[i], status="ok", accuracy=acc, train_seconds=2.0, compile_seconds=1.0,
            images_per_second=50.0))
    return search.SearchState(config={}, config_hash="abc", rounds=(r0, r1), num_trained=6,
                              summary={"lambda": 0.5})


def test_pareto_front():
    acc = [0.9, 0.8, 0.95, 0.7, 0.9, 0.85]
    mem = [5.0, 3.0, 9.0, 1.0, 5.0, 6.0]
    # by memory: 3 (1.0, 0.7), 1 (3.0, 0.8), 0 (5.0, 0.9; 4 equal, dropped), 5 dominated, 2.
    assert reports.pareto_front(acc, mem) == [3, 1, 0, 2]
    assert reports.pareto_front([], []) == []


def test_records_winner_and_best():
    state = _state()
    records = reports.candidate_records(state)
    assert [(r["round"], r["index"]) for r in records] == [(0, 0), (0, 1), (0, 2), (0, 3),
                                                            (1, 0), (1, 1)]
    assert [r["status"] for r in records] == ["ok", "failed", "ok", "ok", "ok", "ok"]
    assert [r["winner"] for r in records] == [False, False, True, False, False, False]
    r0_winner = records[2]
    assert r0_winner["accuracy"] == 0.75  # round 0: the most accurate
    # Round 0 rewards are relative to the medians of its successful candidates.
    assert state.rounds[0].reference.accuracy == 0.625
    assert records[1]["reward"] is None and records[1]["message"] == "boom"
    assert all(r["base_hash"] == r0_winner["hash"] for r in records[4:])
    assert set(records[0]) >= {"architecture", "param_bytes", "working_bytes", "total_bytes",
                               *reports.TIMING_FIELDS}
    best = reports.best_record(state)
    assert best["best"]["hash"] == r0_winner["hash"] and best["best"]["round"] == 0
    assert best["rounds_done"] == 1 and best["status"] == "running"
    assert best["best"]["total_mb"] == r0_winner["total_bytes"] / 1e6


def test_best_json_lists_the_pareto_front():
    state = _state()
    ok = [r for r in reports.candidate_records(state) if r["status"] == "ok"]

    def dominated(r):
        return any(o["accuracy"] >= r["accuracy"] and o["total_bytes"] <= r["total_bytes"]
                   and (o["accuracy"], o["total_bytes"]) != (r["accuracy"], r["total_bytes"])
                   for o in ok)

    best = reports.best_record(state)
    front = best["pareto_front"]
    assert {r["hash"] for r in front} == {r["hash"] for r in ok if not dominated(r)}
    assert [r["total_bytes"] for r in front] == sorted(r["total_bytes"] for r in front)
    assert best["best_on_pareto_front"] is True
    # A round-1 candidate more accurate than the round-0 winner at less memory dominates it.
    winner = reports.winners(state)[0]
    r1 = state.rounds[1]
    r1 = r1.with_entry(0, dataclasses.replace(r1.entries[0],
                                              total_bytes=winner["total_bytes"] - 1))
    state = state.with_round(r1)
    best = reports.best_record(state)
    assert best["best_on_pareto_front"] is False
    assert best["pareto_front"][0]["hash"] == r1.entries[0].hash
    assert "It is not on the Pareto front" in reports.leaderboard_markdown(state)


def test_leaderboard_markdown():
    state = _state()
    text = reports.leaderboard_markdown(state, rows=3)
    assert "Running: round 1, 2/4 candidates trained." in text
    winner = reports.winners(state)[0]
    assert f"Round 0 winner `{winner['hash'][:12]}`" in text
    assert str(from_json(winner["architecture"])) in text
    (row,) = [line for line in text.splitlines() if line.startswith("| 0 | sampled | 9 | 0 |")]
    assert "| 4/4 | 1 |" in row and "| 75.00 |" in row  # 4 of 4 trained, 1 failed
    top = text.split("## Top 3 candidates by accuracy")[1].split("##")[0]
    assert [line.split(" | ")[5] for line in top.splitlines() if line.startswith("| ")][1:] == [
        "87.50", "75.00", "62.50"]


def _events(logdir: pathlib.Path) -> list[tuple[str, float, int]]:
    """(tag, value, step) of every scalar in a TFRecord event file."""
    from tensorboardX.proto import event_pb2
    out = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 16 + length
            out += [(v.tag, v.simple_value, event.step) for v in event.summary.value]
    return out


def test_write_all(tmp_path):
    state = _state()
    reports.write_all(state, tmp_path)
    lines = (tmp_path / reports.CANDIDATES_FILE).read_text().splitlines()
    assert [json.loads(line) for line in lines] == reports.candidate_records(state)
    best = json.loads((tmp_path / reports.BEST_FILE).read_text())
    assert best == reports.best_record(state)
    arch = from_json((tmp_path / reports.BEST_ARCHITECTURE_FILE).read_text())
    assert arch.canonical_hash() == best["best"]["hash"]
    assert (tmp_path / reports.LEADERBOARD_FILE).read_text() == reports.leaderboard_markdown(state)
    import matplotlib.image
    for name in (reports.PARETO_FILE, reports.TRAJECTORY_FILE):
        image = matplotlib.image.imread(tmp_path / name)
        assert image.shape[0] > 400 and image.shape[1] > 600
        assert np.ptp(image[..., :3]) > 0.5  # not blank
    events = _events(tmp_path / reports.TENSORBOARD_DIR)
    expected = reports.tensorboard_scalars(state)
    assert [(t, s) for t, _, s in events] == [(t, s) for t, _, s in expected]
    np.testing.assert_allclose([v for _, v, _ in events], [v for _, v, _ in expected], rtol=1e-6)
    assert ("round/winner_accuracy", 0.75, 0) in events
    # Incremental: a second write with nothing new writes nothing; every point once.
    reports.write_all(state, tmp_path)
    assert len(list((tmp_path / reports.TENSORBOARD_DIR).glob("events.out.tfevents.*"))) == 1
    assert sorted(_events(tmp_path / reports.TENSORBOARD_DIR)) == sorted(events)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_atomic_write_replaces_and_cleans_up(tmp_path):
    path = tmp_path / "f.txt"
    atomic_write(path, "one")
    atomic_write(path, "two")
    assert path.read_text() == "two" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]
    with pytest.raises(TypeError):
        atomic_write(path, 3)  # not text: the old file stays
    assert path.read_text() == "two" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]
    atomic_write(path, b"three", previous=tmp_path / "f.prev")  # the last good copy kept
    assert path.read_bytes() == b"three" and (tmp_path / "f.prev").read_text() == "two"
