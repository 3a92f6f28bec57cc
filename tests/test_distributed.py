"""Multi-process jobs (memnas_jax.distributed): the job layout from flags and environment, and
real 2-process runs on localhost (each process with 2 CPU devices, gloo collectives): training a
candidate gives the result of 1 process with 4 devices; a killed 2-process search resumes."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from memnas_jax import distributed

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_lone_process_needs_no_initialization():
    assert distributed.resolve_layout(environ={}) is None
    assert not distributed.initialize(environ={})
    assert distributed.resolve_layout("10.0.0.1:1234", 1, 0, environ={}) is None


def test_layout_from_arguments_then_environment():
    layout = distributed.resolve_layout("10.0.0.1:1234", 4, 3, environ={})
    assert layout == distributed.ProcessLayout("10.0.0.1:1234", 4, 3) and layout.explicit
    env = {"MEMNAS_COORDINATOR_ADDRESS": "node0:5000", "JAX_NUM_PROCESSES": "8",
           "MEMNAS_PROCESS_ID": "5", "JAX_PROCESS_ID": "6"}
    assert distributed.resolve_layout(environ=env) == distributed.ProcessLayout("node0:5000", 8, 5)
    assert distributed.resolve_layout(process_id=2, environ=env).process_id == 2
    # A cluster manager's variables alone: everything left to JAX's auto-detection.
    assert distributed.resolve_layout(environ={"SLURM_NTASKS": "16"}) == (
        distributed.ProcessLayout())


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_processes=2, process_id=0), "without a coordinator address"),
    (dict(coordinator_address="node0", num_processes=2, process_id=0), "host:port"),
    (dict(coordinator_address="node0:1", num_processes=2, process_id=2), r"not in \[0, 2\)"),
    (dict(coordinator_address="node0:1", num_processes=0, process_id=0), ">= 1"),
])
def test_bad_layouts_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        distributed.resolve_layout(environ={}, **kwargs)
    with pytest.raises(ValueError, match="must be an integer"):
        distributed.resolve_layout(environ={"JAX_COORDINATOR_ADDRESS": "a:1",
                                            "JAX_NUM_PROCESSES": "two"})


def test_config_fields_reach_the_layout(monkeypatch):
    config = distributed.default_config()
    seen = {}
    monkeypatch.setattr(distributed, "initialize",
                        lambda *args: seen.setdefault("args", args) and False)
    distributed.initialize_from_config(dict(distributed=config))
    assert seen["args"] == (None, None, None)  # empty: from the environment
    seen.clear()
    config.update(dict(coordinator_address="node0:9", num_processes=2, process_id=1))
    distributed.initialize_from_config(dict(distributed=config))
    assert seen["args"] == ("node0:9", 2, 1)


# ---------------------------------------------------------------------------------------------
# Real multi-process runs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(script: str, num_processes: int, devices_per_process: int, *args: str,
            port: int | None = None) -> list[subprocess.Popen]:
    """Starts the processes of one job (process i gets argv: i, num_processes, port, args)."""
    port = port or _free_port()
    env = dict(os.environ,
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")
    return [subprocess.Popen([sys.executable, "-c", script, str(i), str(num_processes),
                              str(port), *args], env=env, cwd=REPO_ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(num_processes)]


def _finish(procs: list[subprocess.Popen], timeout: float = 300) -> list[str]:
    outputs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, err[-3000:]
        outputs.append(out)
    return outputs


TRAIN_SCRIPT = r'''
import json, sys
process_id, num_processes, port, out, feed = (int(sys.argv[1]), int(sys.argv[2]), sys.argv[3],
                                              sys.argv[4], sys.argv[5])
from memnas_jax import distributed
joined = distributed.initialize(f"127.0.0.1:{port}", num_processes, process_id)
sys.path.insert(0, "tests")
import jax, numpy as np
from memnas_jax import data as data_lib, train
from helpers import TinyCNN
config = train.default_config()
config.update(dict(epochs=2, batch_size=64, eval_batch_size=64, learning_rate=0.05,
                   milestones=(2,), num_devices=0))
# 150 test images = 64 + 64 + 22: the last eval batch is padded, on host 1 entirely.
data = data_lib.synthetic_dataset(num_train=512, num_validation=128, num_test=150)
if feed == "streamed":  # the ImageNet path: each host decodes and feeds its rows of a batch
    stream = lambda split: data_lib.StreamingSplit(
        [{"image": im, "label": int(y)} for im, y in zip(split.images, split.labels)], 32)
    data = data_lib.Dataset("synthetic-stream", 10, (32, 32, 3), stream(data.train),
                            stream(data.validation), stream(data.test), data.mean, data.std)
r = train.train_model(TinyCNN(), config, data, jax.random.PRNGKey(0))
np.savez(f"{out}_{process_id}.npz", *jax.tree.leaves(r.variables))
print(json.dumps(dict(joined=joined, processes=jax.process_count(), devices=jax.device_count(),
                      local=jax.local_device_count(), status=r.status, message=r.message,
                      loss=list(r.loss_curve), val=r.best_val_accuracy, test=r.test_accuracy,
                      writer=distributed.is_writer())))
'''


@pytest.mark.multiprocess
@pytest.mark.parametrize("feed", ["resident", "streamed"])
def test_two_processes_train_a_candidate_like_one_process_with_four_devices(tmp_path, feed):
    """resident: the CIFAR path (data on every device); streamed: the host pipeline."""
    single = _finish(_launch(TRAIN_SCRIPT, 1, 4, str(tmp_path / "single"), feed))
    pair = _finish(_launch(TRAIN_SCRIPT, 2, 2, str(tmp_path / "pair"), feed))
    one = json.loads(single[0].strip().splitlines()[-1])
    two = [json.loads(out.strip().splitlines()[-1]) for out in pair]
    assert (one["joined"], one["processes"], one["devices"], one["local"]) == (False, 1, 4, 4)
    assert [(r["joined"], r["processes"], r["devices"], r["local"], r["writer"]) for r in two] == [
        (True, 2, 4, 2, True), (True, 2, 4, 2, False)]
    assert one["status"] == "ok", one["message"]
    for r in two:
        assert r["status"] == "ok", r["message"]
        assert r["loss"] == pytest.approx(one["loss"], rel=1e-5)
        assert (r["val"], r["test"]) == (one["val"], one["test"])
    reference = np.load(tmp_path / "single_0.npz")
    for i in range(2):
        leaves = np.load(tmp_path / f"pair_{i}.npz")
        assert len(leaves.files) == len(reference.files) == 8  # 6 params + 2 BN stats
        for name in reference.files:
            np.testing.assert_allclose(leaves[name], reference[name], rtol=1e-4, atol=1e-5)


SEARCH_SCRIPT = r'''
import json, runpy, sys
process_id, num_processes, port, workdir = sys.argv[1:5]
# experiments/cifar10_search.py as a user runs it, on the test preset: rounds 0-1 fully trained
# (2 candidates each), round 2 ranked by the controller (top 2), which every process fits and
# process 0 saves. Candidates checkpoint every epoch, so every process takes part in orbax saves
# and restores.
sys.argv = ["cifar10_search.py", "--config=experiments/configs/cifar10.py:test",
            f"--workdir={workdir}", "--config.search.candidate_checkpoints=True",
            "--config.train.checkpoint_every_epochs=1", "--config.output.progress_bar=False",
            "--config.output.plots=False", "--config.output.tensorboard=False"]
if int(num_processes) > 1:
    sys.argv += [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}",
                 f"--process_id={process_id}"]
from memnas_jax import search
run_experiment = search.run_experiment

def run_and_print(*args, **kwargs):  # the main logs its result; print it for the test
    result = run_experiment(*args, **kwargs)
    print(json.dumps(dict(hash=result.arch_hash, trained=result.num_trained)), flush=True)
    return result

search.run_experiment = run_and_print
sys.path.insert(0, "experiments")
runpy.run_path("experiments/cifar10_search.py", run_name="__main__")
'''


def _records(workdir: pathlib.Path) -> list[dict]:
    from memnas_jax.search import reports
    return [{k: r[k] for k in ("hash", "status", "accuracy", "epochs_done")}
            for r in reports.read_candidates(workdir)]


def _done(workdir: pathlib.Path) -> int:
    from memnas_jax import search
    try:
        state = search.load_state(workdir)
    except search.StateError:
        return 0
    return 0 if state is None else len(state.trained_entries())


@pytest.mark.slow
@pytest.mark.multiprocess
def test_killed_two_process_search_resumes_to_the_single_process_result(tmp_path):
    reference = json.loads(_finish(_launch(SEARCH_SCRIPT, 1, 4, str(tmp_path / "one")))[0]
                           .strip().splitlines()[-1])
    workdir = tmp_path / "pair"
    procs = _launch(SEARCH_SCRIPT, 2, 2, str(workdir))
    deadline = time.monotonic() + 300
    while _done(workdir) < 1 and time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), procs[0].stderr.read()[-3000:]
        time.sleep(0.2)
    assert _done(workdir) >= 1
    # One host dies. The survivor fails at the next barrier (or hangs in a collective) rather
    # than record its peer's death as failed candidates; a cluster manager would end it.
    procs[1].send_signal(signal.SIGKILL)
    try:
        procs[0].wait(timeout=15)
    except subprocess.TimeoutExpired:
        procs[0].kill()
    for p in procs:
        p.wait()
        p.stdout.close()
        p.stderr.close()
    killed_at = _done(workdir)
    assert 1 <= killed_at < 6
    assert _done(tmp_path / "one") == 6
    resumed = [json.loads(out.strip().splitlines()[-1])
               for out in _finish(_launch(SEARCH_SCRIPT, 2, 2, str(workdir)))]
    assert resumed[0] == resumed[1]
    assert resumed[0]["hash"] == reference["hash"]
    records, expected = _records(workdir), _records(tmp_path / "one")
    assert len(records) == len(expected) == 6
    assert [r["hash"] for r in records] == [r["hash"] for r in expected]
    for r, e in zip(records, expected):
        assert (r["status"], r["epochs_done"]) == (e["status"], e["epochs_done"]) == ("ok", 2)
        assert r["accuracy"] == pytest.approx(e["accuracy"], abs=1 / 64 + 1e-9)
    from memnas_jax import controller, search
    state = search.load_state(workdir)
    assert state.rounds[-1].mode == "controller"
    assert (workdir / state.controller.path / controller.PARAMS_FILE).exists()
    assert not (tmp_path / "one" / "candidate_checkpoints").exists() or not any(
        (tmp_path / "one" / "candidate_checkpoints").iterdir())
