"""User errors through the real mains: one clean message on stderr, exit status 2, no traceback.
(Unexpected errors keep theirs.)"""

import json
import os
import pathlib
import subprocess
import sys

from helpers import cpu_only  # tests/ is on sys.path (rootdir conftest)

from memnas_jax.errors import EXIT_USER_ERROR

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SEARCH = REPO_ROOT / "experiments" / "cifar10_search.py"
FINAL = REPO_ROOT / "experiments" / "train_final.py"
CIFAR = REPO_ROOT / "experiments" / "configs" / "cifar10.py"


def _fails_cleanly(*argv, env=None) -> str:
    env = dict(os.environ if env is None else env)
    proc = subprocess.run([sys.executable, *map(str, argv)], capture_output=True, text=True,
                          env=env, timeout=300, check=False)
    assert proc.returncode == EXIT_USER_ERROR, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert len(starts) == 1, proc.stderr[-3000:]
    return "\n".join(lines[starts[0]:])  # the message, and nothing after it


def test_unknown_preset_and_config_field(tmp_path):
    message = _fails_cleanly(SEARCH, f"--config={CIFAR}:tiny", f"--workdir={tmp_path}")
    assert "unknown CIFAR-10 preset 'tiny'; use one of ('auto', 'paper'" in message
    message = _fails_cleanly(SEARCH, "--config.search.max_round=3", f"--workdir={tmp_path}")
    assert "--config.search.max_round=3: the config has no field 'max_round'" in message
    message = _fails_cleanly(SEARCH, f"--config={CIFAR}:test", "--config.search.top_k=0",
                             f"--workdir={tmp_path / 'w'}")
    assert "config.search.top_k must be an integer >= 1, got 0" in message


def test_missing_dataset_names_the_ways_to_provide_it(tmp_path):
    env = dict(os.environ, MEMNAS_DATA_DIR=str(tmp_path / "empty"),
               MEMNAS_CIFAR10_URL="http://127.0.0.1:9/cifar-10-binary.tar.gz")
    message = _fails_cleanly(SEARCH, f"--config={CIFAR}:smoke", f"--workdir={tmp_path / 'w'}",
                             "--config.data.tfds_data_dir=/nonexistent", env=env)
    assert "dataset 'cifar10' not found" in message and "download failed" in message


def test_unwritable_workdir(tmp_path):
    (tmp_path / "a_file").write_text("")
    message = _fails_cleanly(SEARCH, f"--config={CIFAR}:test",
                             f"--workdir={tmp_path / 'a_file' / 'run'}")
    assert "cannot write the work directory" in message and "choose another --workdir" in message


def test_train_final_bad_architecture_file(tmp_path):
    bad = tmp_path / "arch.json"
    bad.write_text(json.dumps({"blocks": [[{"inputs": [0, 0], "ops": ["conv_3x3", "warp"]}]]}))
    message = _fails_cleanly(FINAL, f"--arch={bad}", f"--workdir={tmp_path / 'w'}")
    assert f"--arch={bad} is not a valid architecture JSON" in message
    message = _fails_cleanly(FINAL, f"--arch={tmp_path / 'missing.json'}",
                             f"--workdir={tmp_path / 'w'}")
    assert "cannot read --arch=" in message and "No such file" in message


@cpu_only
def test_auto_preset_is_smoke_on_a_cpu(monkeypatch):
    sys.path.insert(0, str(REPO_ROOT / "experiments"))
    from configs import cifar10
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    assert cifar10.auto_preset()[0] == "smoke"  # this machine has no GPU or TPU
    assert cifar10.get_config().skeleton.width == cifar10.get_config("smoke").skeleton.width
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    assert cifar10.auto_preset() == ("gpu", "JAX_PLATFORMS=cuda")
    assert cifar10.get_config().train.dtype == "bfloat16"  # the gpu preset


def test_bad_skeleton_and_data_that_do_not_fit_end_in_one_line(tmp_path):
    message = _fails_cleanly(SEARCH, f"--config={CIFAR}:test", "--config.skeleton.kind=foo",
                             f"--workdir={tmp_path / 'w'}")
    assert "config.skeleton.kind = 'foo' is not one of ('cifar', 'imagenet')" in message
    import numpy as np
    for split, n in (("train", 600), ("test", 100)):
        np.savez(tmp_path / f"{split}.npz", image=np.zeros((n, 28, 28, 1), np.uint8),
                 label=np.arange(n) % 10)
    message = _fails_cleanly(SEARCH, f"--config={CIFAR}:smoke",
                             f"--config.data.npz_dir={tmp_path}", f"--workdir={tmp_path / 'v'}")
    assert "cifar10 train images in" in message and "are 28x28x1, not cifar10's 32x32x3" in message
