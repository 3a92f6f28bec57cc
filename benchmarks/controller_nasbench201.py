"""How well the structure-correlation controller ranks NAS-Bench-201 architectures it never saw.

Trains on n random architectures (with their real CIFAR-10 validation accuracies), ranks all the
other ones, and prints Kendall tau and precision@50 against the true accuracies for:
  controller        pairwise loss, cross-candidate ranking LSTM (the default config)
  no cross LSTM     the ablation: score from each architecture's own feature
  MSE               the authors' loss (regression on the standardised accuracy)
  params            parameter count, no learning (docs/method.md §7: tau about 0.52)
and times `predict` on 10,000 candidates after compile.

Data: $MEMNAS_DATA_DIR/nasbench201/cifar10_avg.csv (default ../shared/data relative to the repo).

    python benchmarks/controller_nasbench201.py --seeds 0 1 2 --sizes 100 300 1000
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import pathlib
import time

import numpy as np

from memnas_jax import controller, ranking

# NAS-Bench-201: 4 nodes, one edge i -> j (i < j) per pair, each edge one of 5 ops. The cell string
# lists, for each target node j = 1..3, the edges from nodes 0..j-1:
# "|op~0|+|op~0|op~1|+|op~0|op~1|op~2|".
NB201_OPS = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")
NB201_EDGES = tuple((source, target) for target in (1, 2, 3) for source in range(target))
CHANNELS, CELLS_PER_STAGE = (16, 32, 64), 5
K = 50


def default_data_dir() -> pathlib.Path:
    if os.environ.get("MEMNAS_DATA_DIR"):
        return pathlib.Path(os.environ["MEMNAS_DATA_DIR"])
    return pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


def parse_cell(arch_str: str) -> list[int]:
    """The op index (into NB201_OPS) of each edge, in NB201_EDGES order."""
    ops = []
    for target, node in enumerate(arch_str.strip("|").split("|+|"), start=1):
        edges = node.split("|")
        if len(edges) != target:
            raise ValueError(f"{arch_str!r}: node {target} has {len(edges)} inputs, "
                             f"expected {target}")
        for source, edge in enumerate(edges):
            op, from_node = edge.split("~")
            if int(from_node) != source:
                raise ValueError(f"{arch_str!r}: edge {edge!r} out of order")
            ops.append(NB201_OPS.index(op))
    return ops


def cell_tokens(ops: list[int]) -> np.ndarray:
    """One token row per edge: [edge index, source node, target node, op]."""
    rows = [[edge, source, target, op]
            for edge, ((source, target), op) in enumerate(zip(NB201_EDGES, ops))]
    return np.array(rows, np.int32)


def parameter_count(ops: list[int]) -> int:
    """Trainable parameters of the NAS-Bench-201 CIFAR-10 network (C=16, N=5) with this cell.

    Only the convolutions inside the cells vary: ReLU-Conv(C, C, k)-BN(C) has C*C*k*k + 2C
    parameters; 73,306 is the fixed rest (stem, residual reductions, classifier). Checked against
    the 491 `params` of zc_nasbench201.json when that file is present."""
    n3, n1 = ops.count(NB201_OPS.index("nor_conv_3x3")), ops.count(NB201_OPS.index("nor_conv_1x1"))
    per_stage = [c * c * (9 * n3 + n1) + 2 * c * (n3 + n1) for c in CHANNELS]
    return 73_306 + CELLS_PER_STAGE * sum(per_stage)


def check_parameter_counts(zc_path: pathlib.Path) -> int:
    """Compares `parameter_count` with NASLib's params (their op order and edge order differ)."""
    naslib_ops = ("skip_connect", "none", "nor_conv_3x3", "nor_conv_1x1", "avg_pool_3x3")
    naslib_edges = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))
    entries = json.loads(zc_path.read_text())["nasbench201"]["cifar10"]
    for key, values in entries.items():
        by_edge = dict(zip(naslib_edges, (NB201_OPS.index(naslib_ops[int(i)])
                                          for i in key.strip("()").split(","))))
        ops = [by_edge[edge] for edge in NB201_EDGES]
        if abs(parameter_count(ops) - values["params"] * 1e6) > 0.5:
            raise AssertionError(f"parameter count of {key}: {parameter_count(ops)} != "
                                 f"{values['params'] * 1e6}")
    return len(entries)


def load(data_dir: pathlib.Path):
    path = data_dir / "nasbench201" / "cifar10_avg.csv"
    if not path.exists():
        raise SystemExit(f"{path} not found: set MEMNAS_DATA_DIR to the folder holding "
                         "nasbench201/")
    with path.open() as f:
        rows = list(csv.DictReader(f))
    ops = [parse_cell(row["arch_str"]) for row in rows]
    tokens = [cell_tokens(o) for o in ops]
    accuracy = np.array([float(row["valid-accuracy"]) for row in rows])
    params = np.array([parameter_count(o) for o in ops], np.float64)
    return tokens, accuracy, params


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=pathlib.Path, default=default_data_dir())
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-steps", type=int, default=controller.ControllerConfig.max_steps)
    args = parser.parse_args()

    tokens, accuracy, params = load(args.data_dir)
    zc_path = args.data_dir / "nasbench201" / "zc_nasbench201.json"
    if zc_path.exists():
        print(f"parameter_count matches zc_nasbench201.json on {check_parameter_counts(zc_path)} "
              "architectures")
    print(f"{len(tokens)} architectures, best validation accuracy {accuracy.max():.3f}; "
          f"evaluating on all architectures not trained on")

    base = controller.ControllerConfig(max_steps=args.max_steps)
    variants = {
        "controller": base,
        "no cross LSTM": dataclasses.replace(base, cross_candidate=False),
        "MSE": dataclasses.replace(base, loss="mse"),
    }
    results = {}  # (variant, n) -> list of (tau, precision@K, fit seconds, steps)
    states = {}
    for n in args.sizes:
        for seed in args.seeds:
            rng = np.random.default_rng(seed)
            train = rng.choice(len(tokens), n, replace=False)
            test = np.setdiff1d(np.arange(len(tokens)), train)
            y_test = accuracy[test]
            results.setdefault(("params", n), []).append(
                (ranking.kendall_tau(y_test, params[test]),
                 ranking.precision_at_k(y_test, params[test], K), 0.0, 0))
            for name, config in variants.items():
                config = dataclasses.replace(config, seed=seed)
                start = time.perf_counter()
                state = controller.fit([tokens[i] for i in train], accuracy[train], config=config)
                fit_seconds = time.perf_counter() - start
                scores = controller.predict(state, [tokens[i] for i in test])
                results.setdefault((name, n), []).append(
                    (ranking.kendall_tau(y_test, scores), ranking.precision_at_k(y_test, scores, K),
                     fit_seconds, state.steps))
                states[name] = state
                tau, prec = results[(name, n)][-1][:2]
                print(f"  n={n:5d} seed={seed} {name:14s} tau={tau:.3f} P@{K}={prec:.2f} "
                      f"fit={fit_seconds:.1f}s best step={state.steps}", flush=True)

    print()
    print(f"| method | n train | Kendall tau | precision@{K} | fit s | best step |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in list(variants) + ["params"]:
        for n in args.sizes:
            r = np.array(results[(name, n)])
            mean, std = r.mean(axis=0), r.std(axis=0)
            print(f"| {name} | {n} | {mean[0]:.3f} ± {std[0]:.3f} | {mean[1]:.2f} ± {std[1]:.2f} "
                  f"| {mean[2]:.1f} | {mean[3]:.0f} |")
    print(f"(mean ± std over seeds {args.seeds}; evaluated on the {len(tokens)} - n others)")

    print()
    candidates = [tokens[i] for i in np.random.default_rng(0).choice(len(tokens), 10_000, False)]
    for name, state in states.items():
        controller.predict(state, candidates)  # compile
        seconds = []
        for _ in range(5):
            start = time.perf_counter()
            controller.predict(state, candidates)
            seconds.append(time.perf_counter() - start)
        print(f"predict on 10,000 candidates ({name}): median {np.median(seconds):.3f} s, "
              f"min {min(seconds):.3f} s over 5 runs after compile")


if __name__ == "__main__":
    main()
