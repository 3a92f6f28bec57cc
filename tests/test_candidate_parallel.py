"""Candidate-level parallelism (memnas_jax.candidate_parallel): device groups, and candidates
trained concurrently on 2 groups x 2 devices equal to the same candidates trained one by one."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest
from helpers import cpu_only  # tests/ is on sys.path (rootdir conftest)

from memnas_jax import candidate_parallel

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_one_group_is_all_devices_and_errors_are_clear():
    assert candidate_parallel.device_groups(1) == [tuple(jax.devices())]
    with pytest.raises(ValueError, match="must be >= 1"):
        candidate_parallel.device_groups(0)
    with pytest.raises(ValueError, match="cannot split"):
        candidate_parallel.device_groups(len(jax.devices()) + 1)


def test_map_runs_in_item_order_inside_the_group():
    seen = candidate_parallel.map_on_device_groups(
        lambda x, mesh: (x * x, len(mesh.devices)), [3, 1, 2], 1)
    assert seen == [(9, len(jax.devices())), (1, len(jax.devices())), (4, len(jax.devices()))]


GROUPS_SCRIPT = r'''
import json, sys, threading
sys.path.insert(0, "tests")
import jax, numpy as np
from memnas_jax import candidate_parallel, data as data_lib, sharding, train
from helpers import TinyCNN

config = train.default_config()
config.update(dict(epochs=2, batch_size=64, eval_batch_size=64, learning_rate=0.05,
                   milestones=(2,), num_devices=0))
data = data_lib.synthetic_dataset(num_train=256, num_validation=64, num_test=64)
groups = candidate_parallel.device_groups(2)
seeds = [0, 1, 2]
threads = {}

def train_one(seed, mesh):
    mesh_ids = [d.id for d in mesh.devices]
    threads.setdefault(threading.current_thread().name, []).append(seed)
    r = train.train_model(TinyCNN(), config, data, jax.random.PRNGKey(seed), mesh=mesh)
    return dict(status=r.status, devices=mesh_ids, loss=list(r.loss_curve),
                val=r.best_val_accuracy, test=r.test_accuracy,
                leaves=[np.asarray(x).ravel().tolist() for x in jax.tree.leaves(r.variables)])

parallel = candidate_parallel.map_on_device_groups(train_one, seeds, 2)
sequential = []
for seed in seeds:  # one after another on the first 2 devices
    sequential.append(train_one(seed, sharding.make_data_mesh(devices=jax.devices()[:2])))
print(json.dumps(dict(groups=[[d.id for d in g] for g in groups], parallel=parallel,
                      sequential=sequential, threads=sorted(map(sorted, threads.values())))))
'''


def _run_with_four_devices(script: str) -> dict:
    """Runs `script` in a process with 4 CPU devices; the JSON of its last output line."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])

@cpu_only  # four forced XLA host devices
def test_two_groups_of_two_devices_match_sequential_training():
    out = _run_with_four_devices(GROUPS_SCRIPT)
    assert out["groups"] == [[0, 1], [2, 3]]
    # Seeds 0 and 2 on group 0, seed 1 on group 1; the sequential runs all on devices 0-1.
    assert [p["devices"] for p in out["parallel"]] == [[0, 1], [2, 3], [0, 1]]
    assert [s["devices"] for s in out["sequential"]] == [[0, 1]] * 3
    # Two group threads (seeds 0, 2 and seed 1) plus the main thread's sequential runs.
    assert out["threads"] == [[0, 1, 2], [0, 2], [1]]
    for par, seq in zip(out["parallel"], out["sequential"]):
        assert par["status"] == seq["status"] == "ok"
        assert par["loss"] == pytest.approx(seq["loss"], rel=1e-5, abs=1e-6)
        assert par["val"] == seq["val"] and par["test"] == seq["test"]
        for a, b in zip(par["leaves"], seq["leaves"]):
            assert a == pytest.approx(b, rel=1e-4, abs=1e-5)
    # Different keys give different runs (the comparison above is not vacuous).
    assert out["parallel"][0]["loss"] != out["parallel"][1]["loss"]


SEARCH_SCRIPT = r'''
import json, pathlib, sys, tempfile, threading
sys.path.insert(0, "tests")
import jax
from memnas_jax import search, sharding
from memnas_jax.search import reports
from test_search import Interrupted, ScriptedTrainer, _config, _without_timing

class GroupRecordingTrainer(ScriptedTrainer):
    """The scripted trainer, noting the mesh devices of each call; raises Interrupted on the
    candidate `stop_hash` (a deterministic kill point, whatever the thread timing)."""
    def __init__(self, stop_hash=None):
        super().__init__()
        self.stop_hash, self.meshes = stop_hash, set()
    def __call__(self, arch, skeleton, key, mesh=None):
        mesh = mesh or sharding.make_data_mesh()
        self.meshes.add(tuple(d.id for d in mesh.devices))
        if arch.canonical_hash() == self.stop_hash:
            raise Interrupted()
        return super().__call__(arch, skeleton, key)

def run(groups, workdir, trainer):
    config = _config(max_rounds=3, stop_when_no_improvement=False)
    config.parallel.candidate_groups = groups
    return search.run_search(config, workdir, train_fn=trainer)

tmp = pathlib.Path(tempfile.mkdtemp())
one, two = GroupRecordingTrainer(), GroupRecordingTrainer()
sequential, grouped = run(1, tmp / "one", one), run(2, tmp / "two", two)
# Interrupted at the 6th candidate (a chunk's second), then resumed with 2 groups.
stop = one.calls[5]
try:
    run(2, tmp / "resumed", GroupRecordingTrainer(stop))
except Interrupted:
    pass
done = len(search.load_state(tmp / "resumed").trained_entries())
resumed = run(2, tmp / "resumed", GroupRecordingTrainer())
records = {k: _without_timing(reports.read_candidates(tmp / k)) for k in ("one", "two", "resumed")}
print(json.dumps(dict(
    meshes_one=sorted(one.meshes), meshes_two=sorted(two.meshes), done_at_kill=done,
    trained=[sequential.num_trained, grouped.num_trained, resumed.num_trained],
    same_records=[records["two"] == records["one"], records["resumed"] == records["one"]],
    winners=[r.arch_hash for r in (sequential, grouped, resumed)], n=len(records["one"]))))
'''


@cpu_only  # four forced XLA host devices
def test_search_with_candidate_groups_equals_the_sequential_search_and_resumes():
    out = _run_with_four_devices(SEARCH_SCRIPT)
    assert out["meshes_one"] == [[0, 1, 2, 3]]
    assert out["meshes_two"] == [[0, 1], [2, 3]]
    assert out["done_at_kill"] == 4  # the chunk holding the 5th and 6th candidates is lost
    assert out["trained"][0] == out["trained"][1] == out["n"] == 12
    assert out["same_records"] == [True, True]
    assert out["winners"][0] == out["winners"][1] == out["winners"][2]
