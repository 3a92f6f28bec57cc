"""Device meshes and data-parallel shardings (memnas_jax.sharding)."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import cpu_only  # tests/ is on sys.path (rootdir conftest)

from memnas_jax import sharding, xla_flags

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_mesh_over_all_or_some_devices():
    mesh = sharding.make_data_mesh()
    assert mesh.axis_names == (sharding.DATA_AXIS,)
    assert sharding.mesh_size(mesh) == jax.device_count()
    assert sharding.mesh_size(sharding.make_data_mesh(1)) == 1
    with pytest.raises(ValueError, match="xla_force_host_platform_device_count"):
        sharding.make_data_mesh(jax.device_count() + 1)


def test_batch_size_must_divide():
    mesh = sharding.make_data_mesh(1)
    sharding.check_batch_size(7, mesh)
    with pytest.raises(ValueError, match="eval batch size 0 must be a positive multiple"):
        sharding.check_batch_size(0, mesh, "eval batch size")


def test_host_device_flag(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--foo=1 --xla_force_host_platform_device_count=3")
    assert xla_flags.host_device_count_flag() == 3
    assert not xla_flags.set_host_device_count(2)  # a count is already set: left alone
    monkeypatch.setenv("XLA_FLAGS", "")
    jax.devices()  # the backend is up: too late to change the count
    assert not xla_flags.set_host_device_count(2)
    assert os.environ["XLA_FLAGS"] == ""
    with pytest.raises(ValueError, match=">= 1"):
        xla_flags.set_host_device_count(0)


DETERMINISM_SCRIPT = """
import os
from memnas_jax import xla_flags
assert xla_flags.enable_gpu_determinism()  # before the backend starts
import jax, jax.numpy as jnp
print(os.environ["XLA_FLAGS"], float(jax.jit(lambda x: (x * 2).sum())(jnp.ones(3))))
assert not xla_flags.enable_gpu_determinism()  # too late now
"""


def test_gpu_determinism_flags_are_accepted():
    """XLA's deterministic GPU ops are asked for before JAX starts (the flags exist in this
    jaxlib; on a CPU they change nothing, and XLA accepts them)."""
    proc = subprocess.run([sys.executable, "-c", DETERMINISM_SCRIPT], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, XLA_FLAGS=""))
    assert proc.returncode == 0, proc.stderr[-2000:]
    flags, total = proc.stdout.split()[:-1], proc.stdout.split()[-1]
    assert set(flags) == {"--xla_gpu_deterministic_ops=true",
                          "--xla_gpu_exclude_nondeterministic_ops=true"}
    assert total == "6.0"


FOUR_DEVICE_SCRIPT = '''
import json, os
from memnas_jax import sharding
from memnas_jax import xla_flags
assert xla_flags.set_host_device_count(4)  # before the backend starts
assert xla_flags.disable_cpu_ynn_fusions()
assert not xla_flags.disable_cpu_ynn_fusions()  # already set: left alone
import jax, jax.numpy as jnp, numpy as np
mesh = sharding.make_data_mesh()
batch = sharding.shard_batch(np.arange(8 * 3).reshape(8, 3), mesh)
params = sharding.replicate({"w": np.ones(5)}, mesh)
shards = sorted((s.index[0].start or 0, s.data.shape[0]) for s in batch.addressable_shards)
total = jax.jit(lambda b, p: jnp.sum(b) + jnp.sum(p["w"]))(batch, params)
try:
    sharding.check_batch_size(6, mesh)
    error = ""
except ValueError as e:
    error = str(e)
rows = sharding.process_batch_rows(mesh, 8).tolist()
timeout = (f"--xla_cpu_collective_call_terminate_timeout_seconds="
           f"{xla_flags.CPU_COLLECTIVE_TIMEOUT_SECONDS}") in os.environ["XLA_FLAGS"]
ynn_off = os.environ["XLA_FLAGS"].endswith("--xla_cpu_experimental_ynn_fusion_type=")
print(json.dumps(dict(devices=jax.device_count(), shards=shards, total=float(total),
                      replicas=len(params["w"].addressable_shards), error=error, rows=rows,
                      timeout=timeout, ynn_off=ynn_off,
                      flag=xla_flags.host_device_count_flag())))
'''


@cpu_only
def test_four_host_devices_split_the_batch():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", FOUR_DEVICE_SCRIPT], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["devices"] == 4 and out["flag"] == 4
    assert out["shards"] == [[0, 2], [2, 2], [4, 2], [6, 2]]  # 2 rows per device
    assert out["replicas"] == 4
    assert out["rows"] == list(range(8))  # one process feeds every row
    assert out["timeout"]  # XLA:CPU's collective abort set with the device count:
    assert xla_flags.CPU_COLLECTIVE_TIMEOUT_SECONDS == 300  # a stuck collective ends in minutes
    assert out["ynn_off"]  # and XLA accepted the flag (an unknown one aborts at start-up)
    assert out["total"] == float(np.arange(24).sum() + 5)
    assert "batch size 6 must be a positive multiple of the 4 devices" in out["error"]


def test_xla_flags_are_checked_against_the_installed_jaxlib(monkeypatch):
    assert xla_flags._xla_knows_flag("xla_force_host_platform_device_count")
    assert not xla_flags._xla_knows_flag("xla_cpu_no_such_flag_for_memnas")
    jax.devices()  # the backend is up: too late
    monkeypatch.setenv("XLA_FLAGS", "")
    assert not xla_flags.disable_cpu_ynn_fusions() and os.environ["XLA_FLAGS"] == ""
