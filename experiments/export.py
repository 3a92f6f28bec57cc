"""Exports a network to LiteRT (batch 1, float32, inference) and measures it in the runtimes.

    python experiments/export.py --arch=ARCH.json [--width=16] --workdir=DIR
    python experiments/export.py --baseline=resnet20 --workdir=DIR
    python experiments/export.py --checkpoint=TRAIN_FINAL_WORKDIR --workdir=DIR

Writes DIR/model.tflite and DIR/deploy.json: TFLite Micro's planned arena (head, smallest arena
it runs in), LiteRT's arena, our prediction of TFLite Micro's head (`memory_report(...,
convention="deployed")`), the parameter bytes stored in the file, and the largest gap between
JAX's logits and each runtime's on real CIFAR-10 test images. With --checkpoint (a
`train_final.py` work directory: its architecture or baseline, width and trained weights) it also
measures the CIFAR-10 test accuracy of JAX and of both runtimes (all 10,000 images unless
--tflm_images / --litert_images say fewer). Without it the weights are random: the memory
figures do not depend on them.

The model's input is the normalised image, (x / 255 - mean) / std per channel, as in training;
deploy.json records the mean and std. Needs the deploy extra: pip install -e ".[deploy]".
"""

from __future__ import annotations

import json
import pathlib
import time

from absl import app, flags

from memnas_jax import xla_flags  # imports jax, starts no backend
from memnas_jax.errors import UserError, exit_on_user_error

_ARCH = flags.DEFINE_string("arch", None, "An architecture JSON (a search's "
                            "best_architecture.json).")
_WIDTH = flags.DEFINE_integer("width", 16, "Block width w of --arch (CIFAR skeleton).")
_BASELINE = flags.DEFINE_string("baseline", None, "Or a baseline: resnet8, resnet20, resnet56, "
                                "resnet110, mobilenetv2.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A train_final.py work directory: export "
                                  "its trained network.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where model.tflite and deploy.json go.",
                               required=True)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random weights (without --checkpoint).")
_DIFF_IMAGES = flags.DEFINE_integer("diff_images", 100, "Test images compared logit by logit.")
_TFLM_IMAGES = flags.DEFINE_integer("tflm_images", 10000, "With --checkpoint: test images "
                                    "TFLite Micro classifies (it runs at a few dozen images/s).")
_LITERT_IMAGES = flags.DEFINE_integer("litert_images", 10000, "With --checkpoint: test images "
                                      "LiteRT classifies.")
_INT8 = flags.DEFINE_bool("int8", False, "Also write model_int8.tflite: post-training int8 "
                          "(weights and activations), calibrated on training images, and "
                          "measure it beside float32 (deploy.json's int8 section).")
_CALIBRATION_IMAGES = flags.DEFINE_integer("calibration_images", 500, "Training images that "
                                           "calibrate the int8 activation ranges.")


def main(argv):
    del argv
    return exit_on_user_error(_main)


def _main() -> int:
    from memnas_jax import export
    for module in ("litert_converter.converter_api_ext", "ai_edge_litert.interpreter",
                   "tflite_micro.python.tflite_micro.runtime"):
        export.require(module)  # one line naming the extra when it is missing
    if sum(bool(x) for x in (_ARCH.value, _BASELINE.value)) > 1:
        raise UserError("give at most one of --arch=FILE and --baseline=NAME")
    if not (_ARCH.value or _BASELINE.value or _CHECKPOINT.value):
        raise UserError("give --arch=FILE, --baseline=NAME or --checkpoint=TRAIN_FINAL_WORKDIR")
    xla_flags.set_host_device_count(1)
    xla_flags.disable_cpu_ynn_fusions()
    import jax

    from memnas_jax import data as data_lib
    from memnas_jax import deployment, runtimes
    from memnas_jax.io import atomic_write

    network, variables, data_config, trained_epochs = _network_and_weights()
    workdir = pathlib.Path(_WORKDIR.value)
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model = network.model()
    if variables is None:
        variables = deployment.numpy_variables(model, network.image_shape, _SEED.value)
    inference = export.inference_fn(model, variables)
    forward = jax.jit(inference)
    flatbuffer = export.to_flatbuffer(inference, (1, *network.image_shape))
    atomic_write(workdir / "model.tflite", flatbuffer)
    measured = deployment.measure(network, flatbuffer)

    data_config = data_config or data_lib.default_data_config()
    data_config.test_subset = 0
    data_config.train_subset = 0
    dataset = _test_data(data_config)
    images = data_lib.normalized(dataset.test.images[:_DIFF_IMAGES.value], dataset)
    diffs = {
        "tflm": deployment.max_abs_diff(forward, lambda x: runtimes.tflm_predict(flatbuffer, x),
                                        images),
        "litert": deployment.max_abs_diff(
            forward, lambda x: runtimes.litert_predict(flatbuffer, x), images)}
    report = dict(
        network=network.name, kind="baseline" if network.baseline else "searched",
        architecture=json.loads(network.arch.to_json()) if network.arch else None,
        skeleton=network.skeleton.to_dict() if network.skeleton else None,
        weights=(f"trained ({_CHECKPOINT.value}, epoch {trained_epochs})" if _CHECKPOINT.value
                 else f"random (seed {_SEED.value})"),
        input=dict(shape=[1, *network.image_shape], dtype="float32",
                   normalization="(x / 255 - mean) / std", mean=list(dataset.mean),
                   std=list(dataset.std)),
        **{k: v for k, v in measured.to_dict().items() if k != "name"},
        max_abs_diff=max(diffs.values()), max_abs_diff_by_runtime=diffs,
        diff_images=len(images), jax_version=jax.__version__)
    if _CHECKPOINT.value:
        report["accuracy"] = _accuracies(forward, flatbuffer, dataset)
    if _INT8.value:
        report["int8"] = _int8(network, flatbuffer, dataset, forward, workdir)
    report["seconds"] = time.perf_counter() - start
    atomic_write(workdir / "deploy.json", json.dumps(report, indent=1) + "\n")
    print(f"{network.name}: {len(flatbuffer):,} B flatbuffer ({measured.param_bytes:,} B "
          f"constants); TFLite Micro arena head {measured.tflm_arena_head_bytes:,} B (runs in "
          f"{measured.tflm_arena_min_bytes:,} B), predicted {measured.predicted_working_bytes:,}"
          f" B; LiteRT arena {measured.litert_arena_bytes:,} B; max |JAX - runtime| "
          f"{report['max_abs_diff']:.2e}")
    if "accuracy" in report:
        print("test accuracy: " + ", ".join(f"{k} {100 * v['accuracy']:.2f} % "
                                             f"({v['images']} images)"
                                             for k, v in report["accuracy"].items()))
    if "int8" in report:
        q = report["int8"]
        print(f"int8: {q['flatbuffer_bytes']:,} B flatbuffer; TFLite Micro arena head "
              f"{q['tflm_arena_head_bytes']:,} B, predicted {q['predicted_working_bytes']:,} B"
              + "".join(f"; {k} test accuracy {100 * v['accuracy']:.2f} % ({v['images']} "
                        "images)" for k, v in q.get("accuracy", {}).items()))
    print(f"wrote {workdir / 'model.tflite'} and {workdir / 'deploy.json'}")
    return 0


def _network_and_weights():
    """(deployment.Network, variables or None, the data config or None, trained epochs)."""
    from memnas_jax import baselines, deployment
    from memnas_jax.encoding import read_architecture
    from memnas_jax.space import cifar_skeleton
    from memnas_jax.train import checkpoints
    arch = read_architecture(_ARCH.value) if _ARCH.value else None
    if _BASELINE.value and _BASELINE.value not in baselines.BASELINES:
        raise UserError(f"--baseline={_BASELINE.value} is not one of {baselines.BASELINES}")
    if not _CHECKPOINT.value:
        if arch is not None:
            skeleton = cifar_skeleton(_WIDTH.value)
            return (deployment.Network(f"searched {arch.canonical_hash()[:10]}", arch,
                                       skeleton), None, None, None)
        return deployment.Network(_BASELINE.value, baseline=_BASELINE.value), None, None, None
    return _from_checkpoint(arch, checkpoints)


def _from_checkpoint(arch, checkpoints):
    import ml_collections

    from memnas_jax import data as data_lib
    from memnas_jax import deployment, train
    from memnas_jax.encoding import Architecture
    folder = pathlib.Path(_CHECKPOINT.value)
    try:
        result = json.loads((folder / "result.json").read_text())
        config = ml_collections.ConfigDict(result["config"])
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"--checkpoint={folder} is not a finished train_final.py work directory "
                        f"(no readable result.json: {e})") from None
    variables, epoch = checkpoints.restore_variables(folder / "checkpoints")
    if result.get("baseline"):
        if arch is not None or (_BASELINE.value and _BASELINE.value != result["baseline"]):
            raise UserError(f"--checkpoint={folder} holds {result['baseline']}, not what "
                            "--arch/--baseline name; give --checkpoint alone")
        network = deployment.Network(result["baseline"], baseline=result["baseline"])
    else:
        trained = Architecture.from_json(json.dumps(result["architecture"]))
        if arch is not None and arch.canonical_hash() != trained.canonical_hash():
            raise UserError(f"--checkpoint={folder} holds another architecture than --arch")
        dataset = data_lib.load_dataset(config.data)
        skeleton = train.skeleton_from_config(config, dataset)
        network = deployment.Network(result["name"], trained, skeleton)
    try:
        network.model().apply(variables, _zeros(network), train=False)
    except Exception as e:  # the weights do not fit the network
        raise UserError(f"the checkpoint in {folder} does not fit {network.name} "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    return network, variables, config.data, epoch


def _zeros(network):
    import numpy as np
    return np.zeros((1, *network.image_shape), np.float32)


def _test_data(data_config):
    from memnas_jax import data as data_lib
    try:
        return data_lib.load_dataset(data_config)
    except UserError as e:
        raise UserError(f"real test images are needed to compare JAX with the runtimes: {e}"
                        ) from None


def _accuracies(forward, flatbuffer: bytes, dataset) -> dict:
    """Test accuracy of JAX (all images) and of each runtime, with JAX's on the same images."""
    import numpy as np

    from memnas_jax import data as data_lib
    from memnas_jax import runtimes
    images = data_lib.normalized(dataset.test.images, dataset)
    labels = np.asarray(dataset.test.labels)
    start = time.perf_counter()
    jax_predictions = np.concatenate([np.argmax(np.asarray(forward(images[i:i + 500])), -1)
                                      for i in range(0, len(images), 500)])
    out = {"jax": dict(accuracy=float(np.mean(jax_predictions == labels)), images=len(labels),
                       seconds=time.perf_counter() - start)}
    for name, count, predict in (("litert", _LITERT_IMAGES.value, runtimes.litert_predict),
                                 ("tflm", _TFLM_IMAGES.value, runtimes.tflm_predict)):
        count = min(count, len(labels))
        start = time.perf_counter()
        predictions = np.argmax(predict(flatbuffer, images[:count]), -1)
        out[name] = dict(accuracy=float(np.mean(predictions == labels[:count])), images=count,
                         jax_accuracy=float(np.mean(jax_predictions[:count] == labels[:count])),
                         predictions_differing=int(np.sum(predictions
                                                          != jax_predictions[:count])),
                         seconds=time.perf_counter() - start)
    return out


def _int8(network, flatbuffer: bytes, dataset, forward, workdir: pathlib.Path) -> dict:
    """The int8 model: written beside the float one, its arenas, and with --checkpoint its
    test accuracy in both runtimes (float32 logits of JAX are no reference for it)."""
    import numpy as np

    from memnas_jax import arena, deployed, deployment, quantize, runtimes
    from memnas_jax import data as data_lib
    from memnas_jax.io import atomic_write
    calibration = data_lib.normalized(
        dataset.train.images[:_CALIBRATION_IMAGES.value], dataset)
    int8 = quantize.int8_flatbuffer(flatbuffer, calibration)
    atomic_write(workdir / "model_int8.tflite", int8)
    tflm = runtimes.tflm_arena(int8)
    graph = (deployed.baseline_graph(network.baseline, network.num_classes, bytes_per_value=1)
             if network.baseline else deployed.memnas_graph(network.arch, network.skeleton, 1))
    out = dict(flatbuffer_bytes=len(int8), param_bytes=deployment.flatbuffer_constant_bytes(int8),
               tflm_arena_head_bytes=tflm.head_bytes, tflm_arena_min_bytes=tflm.min_bytes,
               litert_arena_bytes=runtimes.litert_arena_bytes(int8),
               predicted_working_bytes=arena.tflm_arena_bytes(graph),
               calibration_images=len(calibration))
    if _CHECKPOINT.value:
        images = data_lib.normalized(dataset.test.images, dataset)
        labels = np.asarray(dataset.test.labels)
        out["accuracy"] = {}
        for name, count, predict in (("litert", _LITERT_IMAGES.value, runtimes.litert_predict),
                                     ("tflm", _TFLM_IMAGES.value, runtimes.tflm_predict)):
            count = min(count, len(labels))
            predictions = np.argmax(predict(int8, images[:count]), -1)
            out["accuracy"][name] = dict(
                accuracy=float(np.mean(predictions == labels[:count])), images=count)
    return out


if __name__ == "__main__":
    app.run(main)
