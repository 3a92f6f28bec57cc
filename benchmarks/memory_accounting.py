"""Which memory accounting reproduces the MemNAS paper's baseline rows?

    python benchmarks/memory_accounting.py

The paper's CIFAR-10 table gives total / parameter memory (MB); their difference is the working
memory it implies. This computes, for the same networks, the accountings that could lie behind
those figures (`memnas_jax.accounting.ACCOUNTINGS`), all in float32 and MB (1e6 bytes):

* liveness: the peak of live activations at batch 1 (`memory.analyze`): what memnas_jax reports;
* liveness_strict_b16: the same peak, strict convention, at batch 16;
* layer_outputs: the sum of every layer's output feature map at batch 1 (no reuse at all);
* training_activations: what the backward pass keeps at batch 1.

The published rows are printed beside, labelled as published, never mixed into our columns.
The last line is `RESULT {json}`.
"""

from __future__ import annotations

import importlib.util
import json

from memnas_jax import accounting
from memnas_jax.baselines import baseline_model

MB = 1e6
# The paper's CIFAR-10 table (total MB, parameter MB, top-1 %): as published.
PUBLISHED = {"resnet56": (6.7, 3.4, 93.0), "resnet110": (9.9, 6.8, None),
             "mobilenetv2": (16.3, 13.9, 94.1), "memnas (lambda 0.5)": (5.8, 0.8, 94.0)}


def accountings(name: str) -> dict:
    model = baseline_model(name)
    rows = {}
    for which in accounting.ACCOUNTINGS:
        if which == "tflm" and importlib.util.find_spec("tflite_micro") is None:
            continue  # measured in the runtime: needs the deploy extra
        m = accounting.measure(model, (32, 32, 3), which)
        rows.setdefault("param MB", m.param_bytes / MB)
        rows[f"{which} MB"] = m.working_bytes / MB
    return rows


def main() -> None:
    names = ("resnet20", "resnet56", "resnet110", "mobilenetv2")
    results = {n: accountings(n) for n in names}
    columns = list(next(iter(results.values())))
    print("| network | " + " | ".join(columns) + " | published working MB (total - param) |")
    print("|---|" + "---|" * (len(columns) + 1))
    for n in names:
        published = PUBLISHED.get(n)
        implied = "" if published is None else f"{published[0] - published[1]:.1f}"
        print(f"| {n} | " + " | ".join(f"{results[n][c]:.3f}" for c in columns)
              + f" | {implied} |")
    print("RESULT " + json.dumps({"networks": results, "published": PUBLISHED}))


if __name__ == "__main__":
    main()
