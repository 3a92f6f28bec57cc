"""The experiment mains and presets, and real searches end to end (real training on synthetic
data, a controller-ranked round, SIGKILL at several points and resume)."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from memnas_jax import data as data_lib
from memnas_jax import search, train
from memnas_jax.encoding import from_json
from memnas_jax.memory import memory_report
from memnas_jax.reward import RewardConfig, memory_efficient_reward
from memnas_jax.search import reports

# config_flags loads config files with the deprecated load_module()
pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
CIFAR_CONFIG = REPO_ROOT / "experiments" / "configs" / "cifar10.py"
IMAGENET_CONFIG = REPO_ROOT / "experiments" / "configs" / "imagenet.py"


def _parse(*argv):
    """The config the mains would get from these flags."""
    values = flags.FlagValues()
    argv = ["prog", *argv]  # the overrides are read from this argv (sys.argv by default)
    config_flags.DEFINE_config_file("config", None, flag_values=values, lock_config=True,
                                    sys_argv=argv)
    values(argv)
    return values.config


def _run_main(script: str, *argv, timeout: float = 600, check: bool = True):
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "experiments" / script), *argv],
                          capture_output=True, text=True, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"{script} exited with {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc


def _without_timing(records):
    return [{k: v for k, v in r.items() if k not in reports.TIMING_FIELDS} for r in records]


# ---------------------------------------------------------------------------------------------
# Configs and flags


def test_flags_select_a_preset_and_override_fields():
    config = _parse(f"--config={CIFAR_CONFIG}:test", "--config.reward.lam=0.8",
                    "--config.memory.budget_mb=6", "--config.grow_trim.ops=(1,6)")
    assert config.reward.lam == 0.8 and config.memory.budget_mb == 6.0
    assert tuple(config.grow_trim.ops) == (1, 6)
    assert config.data.name == "synthetic" and config.search.max_rounds == 3
    with pytest.raises(AttributeError):
        config.not_a_field = 1  # locked: a typo on the command line cannot add a field
    auto = _parse(f"--config={CIFAR_CONFIG}")  # default preset: auto, smoke on a CPU
    assert (auto.skeleton.width, auto.data.train_subset) == (8, 2500)
    paper = _parse(f"--config={CIFAR_CONFIG}:paper")
    assert (paper.skeleton.width, paper.train.epochs, paper.train.batch_size) == (64, 150, 64)
    assert tuple(paper.train.milestones) == (60, 100) and paper.train.learning_rate == 0.01
    assert (paper.reward.lam, paper.search.full_train_rounds, paper.search.top_k) == (0.5, 2, 100)
    assert (paper.search.max_rounds, paper.search.max_cells) == (13, 14)
    assert tuple(paper.grow_trim.round0_combine_modes) == ("add", "concat")


@pytest.mark.parametrize("path, preset", [
    (CIFAR_CONFIG, "paper"), (CIFAR_CONFIG, "gpu"), (CIFAR_CONFIG, "gpu_quick"),
    (CIFAR_CONFIG, "smoke"), (CIFAR_CONFIG, "test"), (IMAGENET_CONFIG, "paper"),
    (IMAGENET_CONFIG, "resized32"), (IMAGENET_CONFIG, "test")])
def test_every_preset_is_a_valid_search_config(path, preset):
    config = _parse(f"--config={path}:{preset}")
    search.check_config(config)
    assert config.search.max_rounds >= 3
    assert config.search.full_train_rounds < config.search.max_rounds  # a controller round


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(Exception, match="unknown CIFAR-10 preset 'tiny'; use one of"):
        _parse(f"--config={CIFAR_CONFIG}:tiny")


def test_smoke_preset_reads_a_cifar10_subset(data_dir, monkeypatch):
    monkeypatch.setenv("MEMNAS_DATA_DIR", str(data_dir))
    from memnas_jax import data
    config = _parse(f"--config={CIFAR_CONFIG}:smoke")
    dataset = data.load_dataset(config.data)
    assert dataset.name == "cifar10" and dataset.image_shape == (32, 32, 3)
    assert (len(dataset.train), len(dataset.validation)) == (2500, 500)
    assert np.bincount(dataset.validation.labels).tolist() == [50] * 10


# ---------------------------------------------------------------------------------------------
# Real searches through the mains


def _reward_of(record, reference, config):
    return float(memory_efficient_reward(
        record["accuracy"], record["param_bytes"], record["working_bytes"],
        base_accuracy=reference.accuracy, base_param_memory=reference.param_bytes,
        base_working_memory=reference.working_bytes, config=RewardConfig(**config.reward)))


def _check_records(records, state, config, image_size):
    """Every record against what it claims: its hash, memory_report's figures on the preset's
    skeleton, an accuracy that is a whole number of the 64 validation images, its reward."""
    skeleton = train.skeleton_from_config(
        config, data_lib.synthetic_dataset(image_shape=(image_size, image_size, 3),
                                                  num_classes=4))
    for r in records:
        arch = from_json(r["architecture"])
        assert arch.canonical_hash() == r["hash"]
        report = memory_report(arch, skeleton)
        assert (r["param_count"], r["param_bytes"], r["working_bytes"], r["total_bytes"]) == (
            report.param_count, report.param_bytes, report.working_bytes, report.total_bytes)
        assert r["status"] == "ok" and r["epochs_done"] == 2
        assert r["accuracy"] * 64 == pytest.approx(round(r["accuracy"] * 64), abs=1e-9)
        assert r["train_seconds"] > 0 and r["compile_seconds"] > 0
        reference = state.rounds[r["round"]].reference
        assert r["reward"] == pytest.approx(_reward_of(r, reference, config), rel=1e-12)


@pytest.fixture(scope="module")
def round0_workdir(tmp_path_factory):
    """cifar10_search.py on the test preset cut to round 0 (two candidates really trained)."""
    workdir = tmp_path_factory.mktemp("round0")
    _run_main("cifar10_search.py", f"--config={CIFAR_CONFIG}:test", f"--workdir={workdir}",
              "--config.search.max_rounds=1", "--config.output.progress_bar=false")
    return workdir


def test_main_trains_and_reports_round0(round0_workdir):
    workdir = round0_workdir
    config = _parse(f"--config={CIFAR_CONFIG}:test", "--config.search.max_rounds=1")
    state = search.load_state(workdir)
    assert state.stop_reason == "round cap reached (1 rounds)"
    records = reports.read_candidates(workdir)
    assert [(r["round"], r["index"]) for r in records] == [(0, 0), (0, 1)]
    _check_records(records, state, config, image_size=16)
    winner = max(records, key=lambda r: r["accuracy"])  # round 0 picks by accuracy
    assert [r["winner"] for r in records] == [r is winner for r in records]
    best = json.loads((workdir / reports.BEST_FILE).read_text())
    assert best["best"]["hash"] == winner["hash"] and best["status"] == "finished"
    assert from_json((workdir / reports.BEST_ARCHITECTURE_FILE).read_text()).canonical_hash() \
        == winner["hash"]
    board = (workdir / reports.LEADERBOARD_FILE).read_text()
    assert f"Round 0 winner `{winner['hash'][:12]}`" in board
    import matplotlib.image
    for name in (reports.PARETO_FILE, reports.TRAJECTORY_FILE):
        image = matplotlib.image.imread(workdir / name)
        assert image.ndim == 3 and image.shape[0] > 400 and np.ptp(image[..., :3]) > 0.5
    assert len(list((workdir / reports.TENSORBOARD_DIR).glob("events.out.tfevents.*"))) == 1


def test_main_resumes_refuses_and_allows_a_changed_config(round0_workdir):
    """The CLI on a finished workdir: the same command only regenerates the outputs; another
    lambda is refused with a readable message; --allow_config_change accepts it."""
    workdir = round0_workdir
    argv = [f"--config={CIFAR_CONFIG}:test", f"--workdir={workdir}",
            "--config.search.max_rounds=1"]
    before = (workdir / reports.CANDIDATES_FILE).read_text()
    _run_main("cifar10_search.py", *argv)
    assert (workdir / reports.CANDIDATES_FILE).read_text() == before
    refused = _run_main("cifar10_search.py", *argv, "--config.reward.lam=0.8", check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "error: " in refused.stderr and "holds a search made with a different config" in (
        refused.stderr)
    assert "reward.lam: 0.5 -> 0.8" in refused.stderr and "--allow_config_change" in refused.stderr
    _run_main("cifar10_search.py", *argv, "--config.reward.lam=0.8", "--allow_config_change")
    assert search.load_state(workdir).config["reward.lam"] == 0.8
    assert (workdir / reports.CANDIDATES_FILE).read_text() == before


@pytest.mark.slow
def test_imagenet_main_runs_end_to_end(tmp_path):
    """imagenet_search.py on synthetic 32 px data and the ImageNet skeleton (global average pool
    head, per-block growth): round 0, then round 1 grown in one block at a time."""
    proc = _run_main("imagenet_search.py", f"--config={IMAGENET_CONFIG}:test",
                     f"--workdir={tmp_path}", "--config.search.max_rounds=2",
                     "--config.output.progress_bar=false")
    assert "search finished" in proc.stderr
    config = _parse(f"--config={IMAGENET_CONFIG}:test")
    records = reports.read_candidates(tmp_path)
    assert [r["round"] for r in records] == [0, 0, 1, 1]
    _check_records(records, search.load_state(tmp_path), config, image_size=32)
    for r in records:
        if r["kind"] == "grow" and r["round"] == 1:
            assert sorted(r["cells_per_block"]) == [1, 1, 1, 1, 2]  # one block grown
    best = json.loads((tmp_path / reports.BEST_FILE).read_text())["best"]
    assert best["hash"] in {r["hash"] for r in records if r["winner"]}


def _search_argv(workdir, cache):
    return [sys.executable, str(REPO_ROOT / "experiments" / "cifar10_search.py"),
            f"--config={CIFAR_CONFIG}:test", f"--workdir={workdir}",
            f"--config.train.compilation_cache_dir={cache}"]


@pytest.fixture(scope="module")
def whole_search(tmp_path_factory):
    """The CIFAR-10 test preset searched for real without interruption: 3 rounds, 2 + 2 sampled
    candidates, then the controller's top 2. Its JAX compilation cache speeds up the reruns of
    the kill test (the cache directory is a run-only field: no effect on results)."""
    root = tmp_path_factory.mktemp("whole")
    env = dict(os.environ)
    start = time.perf_counter()
    subprocess.run(_search_argv(root / "workdir", root / "jax_cache"), env=env, check=True,
                   capture_output=True, timeout=900)
    print(f"real 3-round test search: {time.perf_counter() - start:.1f} s")
    return root / "workdir", root / "jax_cache"


@pytest.mark.slow
def test_real_search_with_a_controller_round(whole_search):
    workdir, _ = whole_search
    config = _parse(f"--config={CIFAR_CONFIG}:test")
    state = search.load_state(workdir)
    assert state.status == "finished"
    assert state.stop_reason == "round cap reached (3 rounds)"
    assert [r.mode for r in state.rounds] == ["sampled", "sampled", "controller"]
    assert [len(r.entries) for r in state.rounds] == [2, 2, 2]
    assert state.num_trained == 6
    # The controller fitted after round 1 on the 4 candidates of rounds 0-1 ranked round 2:
    # its trained entries are its top 2 by predicted score, best first.
    assert state.controller.round == 1
    assert (workdir / state.controller.path / "controller.json").exists()
    r2 = state.rounds[2]
    assert r2.controller_round == 1 and r2.num_generated > 2
    scores = [e.predicted_score for e in r2.entries]
    assert None not in scores and scores == sorted(scores, reverse=True)
    for previous, rnd in zip(state.rounds, state.rounds[1:]):
        assert rnd.base.hash == previous.winner

    records = reports.read_candidates(workdir)
    assert [r["round"] for r in records] == [0, 0, 1, 1, 2, 2]
    assert len({(r["round"], r["hash"]) for r in records}) == 6
    _check_records(records, state, config, image_size=16)
    assert [sum(r["winner"] for r in records if r["round"] == k) for k in range(3)] == [1, 1, 1]

    best = json.loads((workdir / reports.BEST_FILE).read_text())
    assert best["rounds_done"] == 3 and best["best"]["round"] == 2
    assert best["best"]["hash"] == state.rounds[2].winner
    board = (workdir / reports.LEADERBOARD_FILE).read_text()
    assert "Finished: round cap reached (3 rounds)." in board
    assert [line.split(" | ")[1] for line in board.splitlines()
            if line.startswith(("| 0 |", "| 1 |", "| 2 |")) and "/2 |" in line] == [
        "sampled", "sampled", "controller"]


@pytest.mark.slow
def test_search_killed_at_any_point_resumes_to_the_same_result(whole_search, tmp_path):
    """SIGKILL right after the 1st trained candidate, 1.5 s after the 3rd (mid-training), 1 s
    after the 4th (the controller fit), right after the 5th (in the controller-ranked round);
    each time the same command resumes. The result equals the uninterrupted run's: the same
    candidates, results and final architecture."""
    whole, cache = whole_search
    env = dict(os.environ)
    workdir = tmp_path / "killed"
    for after, delay in ((1, 0.0), (3, 1.5), (4, 1.0), (5, 0.0)):
        assert _kill_after(_search_argv(workdir, cache), workdir, after, delay,
                           env) == -signal.SIGKILL
        assert after <= _trained(workdir) < 6
    subprocess.run(_search_argv(workdir, cache), env=env, check=True, capture_output=True,
                   timeout=900)
    assert (_without_timing(reports.read_candidates(workdir))
            == _without_timing(reports.read_candidates(whole)))
    assert json.loads((workdir / reports.BEST_FILE).read_text()) == json.loads(
        (whole / reports.BEST_FILE).read_text())
    assert ((workdir / reports.BEST_ARCHITECTURE_FILE).read_text()
            == (whole / reports.BEST_ARCHITECTURE_FILE).read_text())


def _kill_after(argv, workdir: pathlib.Path, after: int, delay: float, env: dict) -> int:
    """Starts the search, waits until `after` candidates are recorded, then `delay` seconds,
    SIGKILLs it and returns its exit code."""
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    while _trained(workdir) < after:
        if proc.poll() is not None:
            pytest.fail(f"the search ended before candidate {after}:\n"
                        f"{proc.stderr.read().decode()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no candidate {after} within 600 s")
        time.sleep(0.05)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    return proc.returncode


def _trained(workdir: pathlib.Path) -> int:
    try:
        state = search.load_state(workdir)
    except (search.StateError, OSError):
        return 0
    if state is None:
        return 0
    return len(state.trained_entries())


# ---------------------------------------------------------------------------------------------
# Packed training (memnas_jax.packed) through the main: rounds of packs of two


def _packed_argv(workdir, cache):
    return [*_search_argv(workdir, cache), "--config.parallel.packing=packed",
            "--config.parallel.pack_size=2"]


@pytest.fixture(scope="module")
def whole_packed_search(tmp_path_factory):
    root = tmp_path_factory.mktemp("whole_packed")
    env = dict(os.environ)
    subprocess.run(_packed_argv(root / "workdir", root / "jax_cache"), env=env, check=True,
                   capture_output=True, timeout=900)
    return root / "workdir", root / "jax_cache"


@pytest.mark.slow
def test_packed_search_runs_end_to_end(whole_packed_search):
    workdir, _ = whole_packed_search
    state = search.load_state(workdir)
    assert state.status == "finished" and state.num_trained == 6
    for rnd in state.rounds:
        assert rnd.packing == search.Packing(pack_size=2, selection="select")
        assert all(e.status == "ok" for e in rnd.entries)
        # The round's one compile is charged to its first pack; every candidate trained.
        assert sum(e.compile_seconds > 0 for e in rnd.entries) == 2
    records = reports.read_candidates(workdir)
    assert [r["round"] for r in records] == [0, 0, 1, 1, 2, 2]


@pytest.mark.slow
def test_packed_search_killed_resumes_the_same_packs(whole_packed_search, tmp_path):
    """SIGKILL right after the first pack (2 candidates), 8 s into a rerun (compiling or
    training round 1's pack) and right after the second pack; the reruns train the pack in
    flight again and the search ends where the uninterrupted run did."""
    whole, cache = whole_packed_search
    env = dict(os.environ)
    workdir = tmp_path / "killed"
    for after, delay in ((2, 0.0), (2, 8.0), (4, 0.0)):
        assert _kill_after(_packed_argv(workdir, cache), workdir, after, delay,
                           env) == -signal.SIGKILL  # the kill happened, not an exit
        assert _trained(workdir) % 2 == 0  # a pack's results are saved together
    subprocess.run(_packed_argv(workdir, cache), env=env, check=True, capture_output=True,
                   timeout=900)
    assert (_without_timing(reports.read_candidates(workdir))
            == _without_timing(reports.read_candidates(whole)))
    assert json.loads((workdir / reports.BEST_FILE).read_text()) == json.loads(
        (whole / reports.BEST_FILE).read_text())
