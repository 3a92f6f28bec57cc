"""How far apart a search proxy puts its candidates, against how much one candidate moves with
the seed: can the proxy tell candidates apart?

    python benchmarks/proxy_spread.py --config=experiments/configs/cifar10.py:cpu \
        [--candidates=4] [--seeds=3]

Trains the first `--candidates` round-0 candidates of the config (in the authors' order, spread
over the ops) with `--seeds` seeds each, with the config's proxy recipe and data, and prints per
candidate the mean and standard deviation of the proxy accuracy (the search's
`accuracy_metric`) and its memory, then the pooled within-candidate standard deviation (the
noise), the standard deviation of the candidate means (the signal) and the cost per candidate.
"""

from __future__ import annotations

import json
import pathlib
import statistics
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from memnas_jax import xla_flags

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "experiments"))  # the presets

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(pathlib.Path(__file__).parents[1] / "experiments/configs/cifar10.py") + ":cpu",
    "Search config (its data, skeleton and train sections are used).")
_CANDIDATES = flags.DEFINE_integer("candidates", 4, "Round-0 candidates to train.")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds per candidate.")
_OUT = flags.DEFINE_string("out", "", "Also write the RESULT json here.")


def main(argv):
    del argv
    xla_flags.disable_cpu_ynn_fusions()
    import jax
    import numpy as np

    from memnas_jax import data as data_lib
    from memnas_jax import grow_trim, memory, train
    from memnas_jax.search.settings import SearchSettings

    config = _CONFIG.value
    with config.unlocked():
        config.train.compilation_cache_dir = ""  # no work directory here
    settings = SearchSettings.from_config(config)
    dataset = data_lib.load_dataset(config.data)
    skeleton = train.skeleton_from_config(config, dataset)
    candidates = grow_trim.initial_candidates(skeleton.num_blocks,
                                              settings.grow_trim_options(0))
    step = max(len(candidates) // _CANDIDATES.value, 1)
    chosen = candidates[::step][:_CANDIDATES.value]
    metric = settings.search.accuracy_metric
    rows, seconds = [], []
    for c in chosen:
        accuracies = []
        for seed in range(_SEEDS.value):
            start = time.perf_counter()
            result = train.train_candidate(c.architecture, settings.train, dataset,
                                           jax.random.PRNGKey(seed), skeleton=skeleton)
            seconds.append(time.perf_counter() - start)
            if result.status != "ok":
                print(f"{c.describe()} seed {seed}: {result.status} {result.message}")
                continue
            accuracies.append(getattr(result, metric))
        report = memory.memory_report(c.architecture, skeleton)
        rows.append(dict(candidate=c.describe(), hash=c.arch_hash[:10], accuracies=accuracies,
                         mean=statistics.fmean(accuracies),
                         std=statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
                         total_mb=report.total_bytes / 1e6,
                         deployed_working_mb=report.working_bytes_deployed / 1e6))
        print(f"{rows[-1]['candidate']:48s} {100 * rows[-1]['mean']:6.2f} % "
              f"+- {100 * rows[-1]['std']:.2f}  total {rows[-1]['total_mb']:.3f} MB", flush=True)
    within = float(np.sqrt(np.mean([r["std"] ** 2 for r in rows])))
    between = statistics.stdev([r["mean"] for r in rows]) if len(rows) > 1 else 0.0
    result = dict(config=str(config.get("preset", "")), metric=metric,
                  train_images=len(dataset.train), epochs=settings.train.epochs,
                  width=skeleton.widths[0], candidates=len(rows), seeds=_SEEDS.value,
                  within_candidate_std=within, between_candidate_std=between,
                  separation=between / within if within else None,
                  seconds_per_candidate=statistics.fmean(seconds), rows=rows)
    print(f"noise (pooled std over seeds) {100 * within:.2f} points; signal (std of candidate "
          f"means) {100 * between:.2f} points; ratio {result['separation']}; "
          f"{result['seconds_per_candidate']:.0f} s per candidate")
    print("RESULT " + json.dumps(result))
    if _OUT.value:
        pathlib.Path(_OUT.value).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main))
