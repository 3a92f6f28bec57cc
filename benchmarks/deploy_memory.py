"""Our memory conventions against what the deployment runtimes plan.

    python benchmarks/deploy_memory.py [--networks=200] [--out=deploy_memory.json]

For the four baselines and `--networks` random MemNAS networks (`deployment.fuzz_networks`:
every op, add and concat cells, unlinked cells, removed ops of both styles, widths 8-32, both
heads, with and without a stem), exported to LiteRT at batch 1 in float32 with random weights:
the `paper`, `strict` and `deployed` working-memory predictions against TFLite Micro's planned
arena head (read from the runtime) and LiteRT's arena. Prints a table and a `RESULT {json}`
line: the worst relative error of the deployed prediction over all networks, how many match
exactly, and how well the paper convention ranks the networks by their device arena (Kendall
tau, Spearman) and by how much it undercounts it (the ratio head / paper).
"""

from __future__ import annotations

import json
import pathlib
import statistics
import sys
import time

from absl import app, flags

_NETWORKS = flags.DEFINE_integer("networks", 200, "Random MemNAS networks (plus 4 baselines).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random networks.")
_OUT = flags.DEFINE_string("out", "", "Also write every row and the RESULT here (JSON).")
_SHOW = flags.DEFINE_integer("show", 12, "Table rows to print (the baselines, then the first "
                             "random networks); every row goes to --out.")


def main(argv):
    del argv
    from memnas_jax import xla_flags
    xla_flags.disable_cpu_ynn_fusions()
    from scipy import stats

    from memnas_jax import deployment
    start = time.perf_counter()
    networks = (deployment.baseline_networks()
                + deployment.fuzz_networks(_NETWORKS.value, _SEED.value))
    rows = []
    for network in networks:
        flatbuffer = deployment.export_network(network)
        rows.append(deployment.measure(network, flatbuffer, min_arena=False))
    print(f"{'network':12s} {'paper':>10s} {'strict':>10s} {'deployed':>10s} {'TFLM head':>10s} "
          f"{'LiteRT':>10s}  (bytes, batch 1, float32)")
    for r in rows[:_SHOW.value]:
        fmt = lambda v: f"{v:>10,}" if v is not None else f"{'-':>10s}"
        print(f"{r.name:12s} {fmt(r.paper_working_bytes)} {fmt(r.strict_working_bytes)} "
              f"{fmt(r.predicted_working_bytes)} {fmt(r.tflm_arena_head_bytes)} "
              f"{fmt(r.litert_arena_bytes)}")
    searched = [r for r in rows if r.paper_working_bytes is not None]
    head = [r.tflm_arena_head_bytes for r in searched]
    paper = [r.paper_working_bytes for r in searched]
    strict = [r.strict_working_bytes for r in searched]
    summary = deployment.summary(rows)
    result = dict(
        **summary, seed=_SEED.value,
        paper_vs_head=dict(kendall_tau=float(stats.kendalltau(paper, head).statistic),
                           spearman=float(stats.spearmanr(paper, head).statistic),
                           median_ratio=statistics.median(h / p for h, p in zip(head, paper)),
                           max_ratio=max(h / p for h, p in zip(head, paper))),
        strict_vs_head=dict(kendall_tau=float(stats.kendalltau(strict, head).statistic),
                            median_ratio=statistics.median(h / s for h, s in zip(head, strict))),
        litert_vs_head_median_ratio=statistics.median(
            r.litert_arena_bytes / r.tflm_arena_head_bytes for r in rows),
        seconds=time.perf_counter() - start)
    print(f"{summary['networks']} networks: the deployed prediction equals TFLite Micro's head "
          f"for {summary['exact']} (worst relative error {summary['worst_relative_error']:.4f}); "
          f"the paper convention ranks them with Kendall tau "
          f"{result['paper_vs_head']['kendall_tau']:.3f} and undercounts by a median "
          f"{result['paper_vs_head']['median_ratio']:.2f}x")
    print("RESULT " + json.dumps(result))
    if _OUT.value:
        pathlib.Path(_OUT.value).write_text(json.dumps(
            dict(result=result, rows=[r.to_dict() for r in rows]), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main))
