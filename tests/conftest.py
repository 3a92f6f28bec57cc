"""Shared fixtures: where the offline data and the authors' golden files live."""

import json
import os
import pathlib

import jax
import pytest

from memnas_jax import xla_flags

# As the experiment mains do: XLA:CPU's YNNPACK fusions make CPU convolutions several times
# slower (README, "Throughput"). Before any test starts JAX's backends.
xla_flags.disable_cpu_ynn_fusions()

# On NVIDIA GPUs JAX's default precision runs float32 convolutions and matmuls in TF32 (errors
# ~1e-3), and the numeric tests compare against float32 NumPy at ~1e-5: run them at full float32
# precision on every backend (on CPU this is already the default).
jax.config.update("jax_default_matmul_precision", "highest")

# No test may reach the internet: a CIFAR download anyone forgets to point at a local server
# fails at once on a closed local port (tests/test_download.py serves its own archives).
for _name in ("CIFAR10", "CIFAR100"):
    os.environ.setdefault(f"MEMNAS_{_name}_URL", f"http://127.0.0.1:9/offline/{_name.lower()}.tgz")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# Subprocesses (the experiment mains, multi-process scripts) import the package and the presets
# (experiments/configs, as `configs`) as this process does, installed or not.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (
    str(REPO_ROOT), str(REPO_ROOT / "experiments"), os.environ.get("PYTHONPATH"))))


def _shared_path(env_var: str, relative: str) -> pathlib.Path:
    if os.environ.get(env_var):
        return pathlib.Path(os.environ[env_var])
    return REPO_ROOT.parent / "shared" / relative


@pytest.fixture(scope="session")
def golden_dir() -> pathlib.Path:
    path = _shared_path("MEMNAS_REFERENCE_DIR", "reference") / "golden"
    if not (path / "memnas_candidates.json").exists():
        pytest.skip(f"authors' golden data not found at {path}: set MEMNAS_REFERENCE_DIR to the "
                    "folder holding golden/ (../shared/reference in CI)")
    return path


@pytest.fixture(scope="session")
def golden_candidates(golden_dir) -> dict:
    return json.loads((golden_dir / "memnas_candidates.json").read_text())


@pytest.fixture(scope="session")
def golden_estimator(golden_dir) -> dict:
    return json.loads((golden_dir / "estimator_vectors.json").read_text())


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    path = _shared_path("MEMNAS_DATA_DIR", "data")
    if not path.exists():
        pytest.skip(f"offline data not found at {path}: set MEMNAS_DATA_DIR (../shared/data in CI)")
    return path


# The authors' 2-bit link meant add/concat in their rounds 0-1 and the output edge from round 2 on.
GOLDEN_CONVENTION = {"round0": "combine", "round1": "combine", "round2": "link"}


@pytest.fixture(scope="session")
def golden_convention() -> dict:
    return GOLDEN_CONVENTION
