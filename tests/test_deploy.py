"""Deployment: export to LiteRT, the runtimes against JAX, and the deployed memory model against
TFLite Micro's own planner (memnas_jax.export, runtimes, arena, deployed, deployment;
experiments/export.py).

The pure-Python planner tests run everywhere; the rest need the deploy extra and skip, saying so,
where it is absent (CI installs it)."""

import dataclasses
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from memnas_jax import arena, deployed, deployment, encoding, memory
from memnas_jax.space import cifar_skeleton

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
HAVE_DEPLOY = all(importlib.util.find_spec(m) is not None
                  for m in ("litert_converter", "ai_edge_litert", "tflite_micro"))
needs_deploy = pytest.mark.skipif(not HAVE_DEPLOY, reason='the deploy extra is not installed '
                                  '(pip install -e ".[deploy]")')

# TFLite Micro's arena head for the baselines, read from the runtime (tflite-micro
# 0.dev20261023182759, float32, batch 1); docs/deploy.md.
TFLM_HEAD = {"resnet20": 270_592, "resnet56": 270_592, "resnet110": 270_592,
             "mobilenetv2": 1_277_952}


# ---------------------------------------------------------------------------------------------
# The planner and the predicted graphs, in pure Python


def test_greedy_planner_on_hand_made_buffers():
    # Sizes are rounded up to 16; largest first; a buffer reuses space once the other is dead.
    chain = arena.RuntimeGraph((100, 200, 50), ("a", "b", "c"),
                               (arena.RuntimeOp("OP", (0,), 1), arena.RuntimeOp("OP", (1,), 2)),
                               (0,), (2,))
    assert arena.tflm_buffers(chain) == [arena.Buffer(112, 0, 1), arena.Buffer(208, 1, 2),
                                         arena.Buffer(64, 2, 2)]
    assert arena.greedy_offsets(arena.tflm_buffers(chain)) == [208, 0, 208]
    assert arena.tflm_arena_bytes(chain) == 320
    # Scratch lives during its op only.
    scratch = dataclasses.replace(chain, ops=(arena.RuntimeOp("OP", (0,), 1, (1000,)),
                                              arena.RuntimeOp("OP", (1,), 2)))
    assert arena.tflm_arena_bytes(scratch) == 1008 + 112 + 208
    # Equal sizes: the later buffer is placed first (TFLite Micro fills its sort array from the
    # end and sorts stably), which decides where a third one fits.
    ties = [arena.Buffer(64, 0, 1), arena.Buffer(64, 1, 2), arena.Buffer(32, 0, 0)]
    assert arena.greedy_offsets(ties) == [64, 0, 0]


@pytest.mark.parametrize("name", sorted(TFLM_HEAD))
def test_predicted_arena_of_the_baselines_is_tflm_head(name):
    assert arena.tflm_arena_bytes(deployed.baseline_graph(name)) == TFLM_HEAD[name]


def test_deployed_convention_in_memory_report():
    arch = encoding.make_architecture([[(0, 0, "conv_3x3", "sep_conv_3x3")]] * 5)
    skeleton = cifar_skeleton(8)
    reports = {c: memory.memory_report(arch, skeleton, convention=c)
               for c in memory.CONVENTIONS}
    deployed_bytes = arena.tflm_arena_bytes(deployed.memnas_graph(arch, skeleton))
    assert reports["deployed"].working_bytes == deployed_bytes
    assert all(r.working_bytes_deployed == deployed_bytes for r in reports.values())
    assert reports["paper"].working_bytes < reports["strict"].working_bytes <= deployed_bytes
    assert reports["deployed"].total_bytes == reports["deployed"].param_bytes + deployed_bytes
    # Block 2 is strided: the conv and the depthwise conv read padded copies of its input.
    kinds = deployed.memnas_graph(arch, skeleton).op_kinds()
    assert kinds.count("PAD") == 2 and kinds.count("ADD") == 5
    with pytest.raises(ValueError, match="needs a MemNAS architecture"):
        memory.analyze(lambda x: x * 2, np.ones(3, np.float32), convention="deployed")


def test_unlinked_cells_and_shared_pads_follow_the_converter():
    # Cell 1 is unlinked and unread: dropped. Both live ops of cell 2 pad the block input the
    # same way in the strided block: one PAD, placed at its first live use.
    block = [(0, 0, "dil_conv_3x3", "conv_3x3", False), (0, 0, "conv_3x3", "conv_3x3")]
    arch = encoding.make_architecture([[(0, 0, "conv_3x3", "conv_3x3")], block, *[
        [(0, 0, "conv_3x3", "conv_3x3")]] * 3])
    graph = deployed.memnas_graph(arch, cifar_skeleton(8))
    assert graph.op_kinds()[3:7] == ("PAD", "CONV_2D", "CONV_2D", "ADD")
    assert graph.op_kinds().count("PAD") == 2  # blocks 2 and 4


# ---------------------------------------------------------------------------------------------
# Against the runtimes


def _network(cells, width=4, **skeleton):
    arch = encoding.make_architecture([cells] * 5)
    return deployment.Network("test", arch, cifar_skeleton(width, **skeleton))


@needs_deploy
@pytest.mark.parametrize("op", encoding.OP_NAMES + ("none",))
def test_runtimes_agree_with_jax_for_every_op(op):
    """Each op in a stride-1 and a stride-2 block (cells reading the block input), add and
    concat cells: TFLite Micro and LiteRT give JAX's logits, and the arena we predict."""
    from memnas_jax import export, runtimes
    network = _network([(0, 0, op, "conv_3x3"), (0, 1, op, op, True, True)],
                       removed_op="conv1x1" if op == "none" else "identity")
    model = network.model()
    variables = deployment.numpy_variables(model, network.image_shape, seed=1)
    flatbuffer = export.to_flatbuffer(export.inference_fn(model, variables), (1, 32, 32, 3))
    images = np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype(np.float32)
    expected = np.asarray(jax.jit(export.inference_fn(model, variables))(images))
    scale = float(np.max(np.abs(expected)))
    for predict in (runtimes.tflm_predict, runtimes.litert_predict):
        np.testing.assert_allclose(predict(flatbuffer, images), expected, rtol=0,
                                   atol=1e-5 * max(scale, 1.0))
    measured = deployment.measure(network, flatbuffer, min_arena=False, litert=False)
    assert measured.predicted_graph_matches
    assert measured.predicted_working_bytes == measured.tflm_arena_head_bytes


@needs_deploy
@pytest.mark.parametrize("name", ["resnet8", "mobilenetv2"])
def test_runtimes_agree_with_jax_for_the_baselines(name):
    from memnas_jax import export, runtimes
    network = deployment.Network(name, baseline=name)
    model = network.model()
    variables = deployment.numpy_variables(model, network.image_shape, seed=2)
    flatbuffer = export.to_flatbuffer(export.inference_fn(model, variables), (1, 32, 32, 3))
    images = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
    expected = np.asarray(jax.jit(export.inference_fn(model, variables))(images))
    for predict in (runtimes.tflm_predict, runtimes.litert_predict):
        np.testing.assert_allclose(predict(flatbuffer, images), expected, rtol=0,
                                   atol=1e-5 * max(float(np.max(np.abs(expected))), 1.0))


@needs_deploy
def test_tflm_arena_report_and_smallest_arena():
    from memnas_jax import runtimes
    flatbuffer = deployment.export_network(deployment.Network("resnet20", baseline="resnet20"))
    tflm = runtimes.tflm_arena(flatbuffer)
    assert tflm.head_bytes == TFLM_HEAD["resnet20"]
    assert tflm.total_bytes == tflm.head_bytes + tflm.tail_bytes
    assert tflm.total_bytes <= tflm.min_bytes <= tflm.total_bytes + 16  # bisected to the byte
    # LiteRT's builtin kernels plan more (im2col buffers), as docs/deploy.md reports.
    assert runtimes.litert_arena_bytes(flatbuffer) == 798_720
    # Our planner on the runtime's own graph gives its head too.
    assert arena.tflm_arena_bytes(runtimes.runtime_graph(flatbuffer)) == tflm.head_bytes


def _fuzz(count):
    rows = []
    for network in deployment.baseline_networks() + deployment.fuzz_networks(count):
        flatbuffer = deployment.export_network(network)
        rows.append(deployment.measure(network, flatbuffer, min_arena=False, litert=False))
    bad = [r.to_dict() for r in rows if r.relative_error or not r.predicted_graph_matches]
    assert not bad, bad[:3]
    assert deployment.summary(rows)["worst_relative_error"] == 0.0


@needs_deploy
def test_deployed_model_equals_tflm_on_a_fuzz_sample():
    _fuzz(8)


@needs_deploy
@pytest.mark.slow
def test_deployed_model_equals_tflm_on_the_whole_fuzz_set():
    # 80 networks plus the four baselines (CI's budget); benchmarks/deploy_memory.py
    # --networks=200 reports 204 of 204 exact (results/deploy/deploy_memory.json).
    _fuzz(80)


@needs_deploy
def test_a_network_tflm_cannot_run_is_one_clear_error():
    import flax.linen as nn

    from memnas_jax import export, runtimes
    from memnas_jax.errors import UserError

    def padded_average(x):  # a padded reduce_window: LiteRT runs it, TFLite Micro does not
        return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=True)
    flatbuffer = export.to_flatbuffer(padded_average, (1, 8, 8, 3))
    with pytest.raises(UserError, match="TFLite Micro cannot run this network") as info:
        runtimes.tflm_arena(flatbuffer)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# The command


def _run(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "experiments/export.py", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env=env or dict(os.environ))


@needs_deploy
def test_export_command_for_an_architecture(tmp_path, data_dir):
    arch_file = tmp_path / "arch.json"
    arch = encoding.make_architecture([[(0, 0, "sep_conv_5x5", "max_pool_3x3"),
                                        (1, 0, "avg_pool_3x3", "none", True, True)]] * 5)
    arch_file.write_text(arch.to_json())
    proc = _run(f"--arch={arch_file}", "--width=8", f"--workdir={tmp_path / 'out'}",
                "--diff_images=20")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "deploy.json").read_text())
    assert (tmp_path / "out" / "model.tflite").stat().st_size == report["flatbuffer_bytes"]
    for key in ("tflm_arena_head_bytes", "tflm_arena_min_bytes", "litert_arena_bytes",
                "predicted_working_bytes", "param_bytes", "max_abs_diff"):
        assert key in report, key
    assert report["predicted_working_bytes"] == report["tflm_arena_head_bytes"]
    assert report["predicted_working_bytes"] == memory.memory_report(
        arch, cifar_skeleton(8), convention="deployed").working_bytes
    assert report["max_abs_diff"] < 1e-4 and report["diff_images"] == 20
    assert report["tflm_arena_min_bytes"] >= report["tflm_arena_head_bytes"]


@needs_deploy
@pytest.mark.slow
def test_export_command_with_a_trained_checkpoint(tmp_path, data_dir):
    """train_final.py, then export its work directory: the runtimes classify the test images
    as JAX does (within 0.1 point), and the checkpoint's width and weights are used."""
    arch_file = tmp_path / "arch.json"
    arch_file.write_text(encoding.uniform_architecture([(0, 0, "conv_3x3", "sep_conv_3x3")]
                                                       ).to_json())
    train = subprocess.run(
        [sys.executable, "experiments/train_final.py",
         "--config=experiments/configs/train_final.py:smoke", f"--arch={arch_file}",
         "--config.epochs=1", "--config.milestones=()", "--config.skeleton.width=4",
         "--config.data.train_subset=500", "--config.data.test_subset=200", "--host_devices=1",
         f"--workdir={tmp_path / 'final'}"], cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    proc = _run(f"--checkpoint={tmp_path / 'final'}", f"--workdir={tmp_path / 'out'}",
                "--tflm_images=300", "--litert_images=2000", "--diff_images=20")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "deploy.json").read_text())
    accuracy = report["accuracy"]
    assert accuracy["jax"]["images"] == 10_000  # the whole test set, whatever the training used
    for runtime in ("tflm", "litert"):
        assert abs(accuracy[runtime]["accuracy"] - accuracy[runtime]["jax_accuracy"]) <= 0.001
    assert report["skeleton"]["widths"] == [4] * 5 and "epoch 1" in report["weights"]
    assert report["predicted_working_bytes"] == report["tflm_arena_head_bytes"]


def _one_line_error(proc):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return lines[0]


def test_export_without_the_extra_names_it(tmp_path):
    hide = ("import sys, runpy; sys.modules['litert_converter'] = None; "
            "sys.argv = ['experiments/export.py', '--baseline=resnet20', "
            f"'--workdir={tmp_path}']; runpy.run_path('experiments/export.py', "
            "run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", hide], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)
    assert 'pip install -e ".[deploy]"' in _one_line_error(proc)


@needs_deploy
def test_export_errors_are_one_line(tmp_path):
    assert "--checkpoint" in _one_line_error(_run(f"--workdir={tmp_path}"))
    assert "not one of" in _one_line_error(_run("--baseline=vgg", f"--workdir={tmp_path}"))
    missing = _one_line_error(_run(f"--checkpoint={tmp_path / 'nothing'}",
                                   f"--workdir={tmp_path / 'out'}"))
    assert "result.json" in missing
    # A work directory whose checkpoint is gone or broken.
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "result.json").write_text(json.dumps(
        {"name": "resnet20", "baseline": "resnet20", "config": {"data": {}}}))
    assert "no checkpoint" in _one_line_error(_run(f"--checkpoint={tmp_path / 'final'}",
                                                   f"--workdir={tmp_path / 'out'}"))
    (tmp_path / "final" / "checkpoints" / "3" / "state").mkdir(parents=True)
    assert "unreadable" in _one_line_error(_run(f"--checkpoint={tmp_path / 'final'}",
                                                f"--workdir={tmp_path / 'out'}"))
    bad_arch = tmp_path / "bad.json"
    bad_arch.write_text("{}")
    assert "not a valid architecture" in _one_line_error(_run(f"--arch={bad_arch}",
                                                              f"--workdir={tmp_path}"))
