"""Does training reproduce bit for bit? One candidate trained twice, each time in a fresh
process (fresh compile, fresh autotuning, no compilation cache), compared bit for bit.

    python benchmarks/determinism.py --preset gpu --epochs 1 --train_subset 2000
    python benchmarks/determinism.py --preset test --epochs 1            # CI-sized, on a CPU

With `--deterministic both` (default) the pair runs twice: without and with XLA's deterministic
GPU ops (`gpu_deterministic`, `xla_flags.enable_gpu_determinism`), which shows whether the
option is needed on this backend and what it costs (training seconds of the two pairs). The
candidate is the first of round 0 in the search's training order. Prints a table and
`RESULT {json}`: per setting, whether the two runs' variables and loss curves are identical, the
largest absolute difference of a variable, and the training seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "experiments"))  # the presets: experiments/configs


def worker(spec: dict) -> None:
    """Trains the candidate in this process; saves its variables (.npz) and prints its curve."""
    from memnas_jax import xla_flags
    xla_flags.disable_cpu_ynn_fusions()
    enabled = spec["deterministic"] and xla_flags.enable_gpu_determinism()
    import jax

    from configs import cifar10
    from memnas_jax import data as data_lib
    from memnas_jax import search, train
    from memnas_jax.grow_trim import initial_candidates

    config = cifar10.get_config(spec["preset"])
    config.train.epochs = spec["epochs"] or config.train.epochs
    if spec["train_subset"]:
        config.data.train_subset = spec["train_subset"]
    if spec["validation_size"] is not None:
        config.data.validation_size = spec["validation_size"]
    config.train.compilation_cache_dir = ""  # a fresh compile and autotune each run
    dataset = dataclasses.replace(data_lib.load_dataset(config.data), test=None)
    skeleton = train.skeleton_from_config(config, dataset)
    settings = search.SearchSettings.from_config(config)
    archs = [c.architecture for c in initial_candidates(skeleton.num_blocks,
                                                        settings.grow_trim_options(0))]
    arch = archs[search.training_order(archs)[0]]
    result = train.train_candidate(arch, settings.train, dataset,
                                   search.candidate_key(config.seed, arch.canonical_hash()),
                                   skeleton=skeleton)
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(result.variables)[0]}
    np.savez(spec["out"], **flat)
    print("WORKER " + json.dumps(dict(
        status=result.status, loss_curve=list(result.loss_curve),
        train_s=sum(result.epoch_seconds), backend=jax.default_backend(),
        device=jax.devices()[0].device_kind, deterministic_flags=bool(enabled),
        digest=hashlib.sha256(b"".join(flat[k].tobytes() for k in sorted(flat))).hexdigest())))


def _run(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)],
                          cwd=REPO_ROOT, capture_output=True, text=True, check=False,
                          env=dict(os.environ))
    lines = [x for x in proc.stdout.splitlines() if x.startswith("WORKER ")]
    if proc.returncode or not lines:
        sys.exit(f"a training failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("WORKER "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--preset", default="test", help="cifar10.py preset")
    parser.add_argument("--epochs", type=int, default=1, help="epochs (0: the preset's)")
    parser.add_argument("--train_subset", type=int, default=0,
                        help="training images (0: the preset's)")
    parser.add_argument("--validation_size", type=int, default=None,
                        help="images held out for validation (default: the preset's)")
    parser.add_argument("--deterministic", default="both", choices=("both", "on", "off"),
                        help="XLA's deterministic GPU ops: off, on, or a pair of each")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    settings = {"both": (False, True), "on": (True,), "off": (False,)}[args.deterministic]
    rows = []
    with tempfile.TemporaryDirectory(prefix="determinism_") as tmp:
        for deterministic in settings:
            runs, arrays = [], []
            for k in range(2):
                out = os.path.join(tmp, f"{deterministic}_{k}.npz")
                runs.append(_run(dict(vars(args), worker="", deterministic=deterministic,
                                      out=out)))
                arrays.append(np.load(out))
            diff = max(float(np.max(np.abs(arrays[0][k].astype(np.float64)
                                           - arrays[1][k].astype(np.float64))))
                       for k in arrays[0].files)
            rows.append(dict(deterministic=deterministic,
                             flags_set=runs[0]["deterministic_flags"],
                             identical=runs[0]["digest"] == runs[1]["digest"],
                             same_loss_curve=runs[0]["loss_curve"] == runs[1]["loss_curve"],
                             max_abs_diff=diff, train_s=[r["train_s"] for r in runs],
                             status=[r["status"] for r in runs]))
    print(f"\n## determinism ({runs[0]['backend']}, {runs[0]['device']}; {args.preset} preset, "
          f"{args.epochs} epoch(s))\n")
    print("| deterministic ops | flags set | variables identical | loss curves identical | "
          "max abs diff | train s (run 1, run 2) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['deterministic']} | {r['flags_set']} | {r['identical']} | "
              f"{r['same_loss_curve']} | {r['max_abs_diff']:.3g} | "
              f"{r['train_s'][0]:.1f}, {r['train_s'][1]:.1f} |")
    print("RESULT " + json.dumps(dict(backend=runs[0]["backend"], device=runs[0]["device"],
                                      preset=args.preset, epochs=args.epochs, rows=rows),
                                 sort_keys=True))


if __name__ == "__main__":
    main()
