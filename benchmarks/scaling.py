"""Scaling of the search: candidates per hour against devices, and a cost model for pods.

1. Measured, on simulated CPU devices (one subprocess per device count, each with
   `--xla_force_host_platform_device_count=D`): the same small candidates trained
   * data-parallel: one after another, each over all D devices (`candidate_groups=1`), and
   * candidate groups: D at a time, one device each (`candidate_groups=D`,
     `memnas_jax.candidate_parallel`),
   timed wall clock, compile included (as a search pays it). Simulated devices share the host's
   cores: this measures the overheads each mode removes or adds, not real speed-ups.

2. A cost model of full searches from XLA's FLOP count (`cost_analysis` of the lowered train
   step: forward, backward and SGD update, depthwise convs as on GPU/TPU) of paper-size
   candidates, for assumed sustained throughputs of GPU and TPU systems.

    python benchmarks/scaling.py                      # both parts
    python benchmarks/scaling.py --device_counts 1 2 --num_candidates 4 --skip_cost_model
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# Small candidates: one cell per block, each a different pair of ops (grow-trim round-0 style).
_OPS = ("conv_3x3", "sep_conv_3x3", "max_pool_3x3", "dil_conv_3x3", "sep_conv_5x5",
        "avg_pool_3x3", "fac_conv_7")


def _small_candidates(count: int):
    from memnas_jax.encoding import uniform_architecture
    pairs = [(a, b) for a in _OPS for b in _OPS]
    return [uniform_architecture([(0, 0, *pairs[(5 * i) % len(pairs)])]) for i in range(count)]


def _worker(groups: int, num_candidates: int, width: int, image_size: int, num_train: int,
            epochs: int) -> dict:
    """Runs in a subprocess with D devices: trains the candidates with `groups` groups."""
    import jax

    from memnas_jax import candidate_parallel, train
    from memnas_jax import data as data_lib

    config = train.default_config()
    config.skeleton.width = width
    config.update(dict(epochs=epochs, batch_size=64, eval_batch_size=64, learning_rate=0.05,
                       milestones=(), num_devices=0))
    data = data_lib.synthetic_dataset(num_train=num_train, num_validation=128, num_test=0,
                                      image_shape=(image_size, image_size, 3), num_classes=4)
    candidates = _small_candidates(num_candidates)
    start = time.perf_counter()
    results = candidate_parallel.map_on_device_groups(
        lambda arch: train.train_candidate(arch, config, data, jax.random.PRNGKey(0)),
        candidates, groups)
    wall = time.perf_counter() - start
    bad = [r.message for r in results if not r.ok]
    if bad:
        raise RuntimeError(f"candidates failed: {bad}")
    return dict(devices=jax.device_count(), groups=groups, candidates=len(results),
                wall_seconds=wall, candidates_per_hour=3600 * len(results) / wall,
                compile_seconds=sum(r.compile_seconds for r in results) / len(results),
                train_images_per_second=sum(r.images_per_second for r in results) / len(results))


def measure(device_counts, num_candidates, **sizes) -> list[dict]:
    rows = []
    for devices in device_counts:
        for groups in sorted({1, devices}):
            env = dict(os.environ,
                       XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
            spec = json.dumps(dict(groups=groups, num_candidates=num_candidates, **sizes))
            proc = subprocess.run([sys.executable, __file__, "--worker", spec], env=env,
                                  cwd=REPO_ROOT, capture_output=True, text=True, check=False)
            if proc.returncode:
                raise RuntimeError(f"{devices} devices, {groups} groups:\n{proc.stderr[-3000:]}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"  {devices} device(s), {groups} group(s): {row['wall_seconds']:.1f} s",
                  flush=True)
    return rows


def print_measured(rows: list[dict]) -> None:
    print("\n| devices | mode | candidates/hour | wall s | mean compile s | mean train img/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        mode = ("data-parallel" if r["groups"] == 1 else f"{r['groups']} groups x "
                f"{r['devices'] // r['groups']} device")
        print(f"| {r['devices']} | {mode} | {r['candidates_per_hour']:.0f} | "
              f"{r['wall_seconds']:.1f} | {r['compile_seconds']:.1f} | "
              f"{r['train_images_per_second']:.0f} |")


# ---------------------------------------------------------------------------------------------
# Cost model


def train_step_flops(arch, skeleton, batch_size: int) -> float:
    """XLA's FLOP count of one SGD train step (forward, backward, update) at `batch_size`, from
    the lowered (not compiled) computation with the plain depthwise convs GPUs/TPUs run."""
    import jax
    import jax.numpy as jnp
    import optax

    from memnas_jax import train
    from memnas_jax.network import MemNASNetwork

    model = MemNASNetwork(arch, skeleton, depthwise_impl="xla")
    images = jax.ShapeDtypeStruct((batch_size, skeleton.image_size, skeleton.image_size,
                                   skeleton.in_channels), jnp.float32)
    labels = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(
        (1, *images.shape[1:])), train=False))
    tx = optax.sgd(0.01, momentum=0.9)
    opt_state = jax.eval_shape(tx.init, variables["params"])

    def step(params, batch_stats, opt_state, x, y):
        def loss_fn(p):
            logits, updates = model.apply({"params": p, "batch_stats": batch_stats}, x,
                                          train=True, mutable=["batch_stats"])
            return jnp.mean(train.cross_entropy(logits, y)), updates["batch_stats"]
        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, loss

    lowered = jax.jit(step).lower(variables["params"], variables["batch_stats"], opt_state,
                                  images, labels)
    analysis = lowered.cost_analysis()
    return float((analysis[0] if isinstance(analysis, (list, tuple)) else analysis)["flops"])


# A typical grown cell sequence (round r's candidates have about r + 1 cells per block).
_GROWN_CELLS = ((0, 0, "sep_conv_3x3", "conv_3x3"), (1, 0, "sep_conv_5x5", "max_pool_3x3"),
                (2, 1, "dil_conv_3x3", "sep_conv_3x3"))


@dataclasses.dataclass(frozen=True)
class SearchShape:
    """A search's size: candidates trained per round, epochs and images per epoch."""

    name: str
    candidates_per_round: tuple[int, ...]
    epochs: int
    images_per_epoch: int


@dataclasses.dataclass(frozen=True)
class System:
    name: str
    chips: int
    peak_flops_per_chip: float  # dense, the precision named
    utilisation: float

    @property
    def sustained(self) -> float:
        return self.chips * self.peak_flops_per_chip * self.utilisation


SYSTEMS = (
    System("8x H100 SXM, bf16 dense 989 TF/s, 40 %", 8, 989e12, 0.40),
    System("8x A100, bf16 dense 312 TF/s, 40 %", 8, 312e12, 0.40),
    System("8x A100, fp32 19.5 TF/s, 40 %", 8, 19.5e12, 0.40),
    System("TPU v5e-64, bf16 197 TF/s/chip, 40 %", 64, 197e12, 0.40),
    System("8x H100, bf16, 10 % (small nets, batch 64)", 8, 989e12, 0.10),
)

# The paper's CIFAR-10 search: 13 rounds, rounds 0-1 fully trained (98 + 392), then top-100.
CIFAR_SEARCH = SearchShape("CIFAR-10 (paper)", (98, 392) + (100,) * 11, 150, 50_000)
# ImageNet: the same round structure; our paper preset trains candidates 5 epochs (a proxy).
IMAGENET_SEARCH = SearchShape("ImageNet (5-epoch proxy)", (98, 392) + (100,) * 11, 5, 1_281_167)


def per_image_flops_by_cells(skeleton, batch_size: int) -> dict[int, float]:
    """Train FLOPs per image of candidates with 1, 2, 3 grown cells per block."""
    from memnas_jax.encoding import uniform_architecture
    return {n: train_step_flops(uniform_architecture(_GROWN_CELLS[:n]), skeleton, batch_size)
            / batch_size for n in (1, 2, 3)}


def round_flops_per_image(round_index: int, flops_by_cells: dict[int, float]) -> float:
    """Train FLOPs per image of a round's candidates (about round + 1 cells per block):
    measured where available, else the quadratic through the measured sizes (a block's output
    is the concat of its n cells, so the next block's ops read n x C channels: work ~ n^2)."""
    import numpy as np
    cells = round_index + 1
    if cells in flops_by_cells:
        return flops_by_cells[cells]
    sizes = sorted(flops_by_cells)
    quadratic = np.polyfit(sizes, [flops_by_cells[n] for n in sizes], 2)
    return float(np.polyval(quadratic, cells))


def search_flops(shape: SearchShape, flops_by_cells: dict[int, float]) -> float:
    """Total training FLOPs of a search."""
    return sum(count * round_flops_per_image(r, flops_by_cells) * shape.epochs
               * shape.images_per_epoch for r, count in enumerate(shape.candidates_per_round))


def cost_model() -> None:
    from memnas_jax.space import cifar_skeleton, imagenet_skeleton
    shapes = ((CIFAR_SEARCH, cifar_skeleton(64), 64),
              (IMAGENET_SEARCH, imagenet_skeleton(32, 224, 1000), 256))
    for shape, skeleton, batch in shapes:
        start = time.perf_counter()
        flops = per_image_flops_by_cells(skeleton, batch)
        total = search_flops(shape, flops)
        print(f"\n{shape.name}: widths {list(skeleton.widths)}, batch {batch}; train FLOPs per "
              "image (XLA cost_analysis, fwd + bwd + update): "
              + ", ".join(f"{n} cell(s) {f / 1e9:.3f} GFLOP" for n, f in flops.items())
              + f" ({time.perf_counter() - start:.0f} s to lower)")
        last = len(shape.candidates_per_round) - 1
        print(f"  round {last} ({last + 1} cells, extrapolated): "
              f"{round_flops_per_image(last, flops) / 1e9:.2f} GFLOP per image")
        print(f"  {sum(shape.candidates_per_round)} candidates x {shape.epochs} epochs x "
              f"{shape.images_per_epoch:,} images = {total:.3g} FLOP (training only; "
              "validation adds a few %)")
        print("  | system | sustained PFLOP/s | search time |")
        print("  |---|---|---|")
        for system in SYSTEMS:
            seconds = total / system.sustained
            print(f"  | {system.name} | {system.sustained / 1e15:.2f} | "
                  f"{seconds / 3600:.1f} h = {seconds / 86400:.2f} days |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device_counts", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--num_candidates", type=int, default=8)
    parser.add_argument("--width", type=int, default=4)
    parser.add_argument("--image_size", type=int, default=16)
    parser.add_argument("--num_train", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--skip_measure", action="store_true")
    parser.add_argument("--skip_cost_model", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(**json.loads(args.worker))))
        return
    if not args.skip_measure:
        print(f"Measured: {args.num_candidates} candidates (1 cell per block, width "
              f"{args.width}, {args.image_size} px, {args.num_train} images x {args.epochs} "
              f"epochs, batch 64) on simulated CPU devices ({os.cpu_count()} cores)")
        rows = measure(args.device_counts, args.num_candidates, width=args.width,
                       image_size=args.image_size, num_train=args.num_train,
                       epochs=args.epochs)
        print_measured(rows)
    if not args.skip_cost_model:
        cost_model()


if __name__ == "__main__":
    main()
