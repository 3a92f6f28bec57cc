"""A searched network against the hand-designed baselines, under one memory accounting.

`gather(search_dir, final_dirs)` reads a finished search (its answer and the Pareto front of its
trained candidates, `best.json`) and the work directories of `experiments/train_final.py` runs
(the answer's final training and the `--baseline` runs: `result.json`, whose memory figures all
come from `memory.analyze` at batch 1). `write(rows, out_dir)` writes `results.md` and
`results.png` (accuracy against total memory). The paper's CIFAR-10 rows are drawn hollow and
labelled "as published": they are never mixed into our columns, and their memory accounting is
not ours (README, "Memory accounting").
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import statistics
from typing import Sequence

from memnas_jax.io import atomic_write
from memnas_jax.memory import MB
from memnas_jax.plots import pyplot, save_figure

RESULT_FILE = "result.json"  # what train_final.py writes in its work directory
# The MemNAS paper's CIFAR-10 table: (name, total MB, parameter MB, top-1 %), as published.
PUBLISHED = (("MemNAS, lambda 0.5", 5.8, 0.8, 94.0), ("ResNet-56", 6.7, 3.4, 93.0),
             ("ResNet-110", 9.9, 6.8, None), ("MobileNetV2", 16.3, 13.9, 94.1))


@dataclasses.dataclass(frozen=True)
class Row:
    """One network of the comparison. Accuracies are fractions; memory in bytes."""

    name: str
    kind: str  # "searched" (final training), "baseline", "search candidate" (proxy training)
    accuracy: float | None
    accuracy_of: str  # what the accuracy is: "test, 300 epochs", "validation (proxy, 2 epochs)"
    param_bytes: int
    working_bytes: int
    total_bytes: int
    epochs: int | None
    wall_seconds: float | None
    device_arena_bytes: int | None = None  # TFLite Micro's arena head, measured (accounting tflm)
    width: int | None = None  # a searched network's block width w
    param_count: int | None = None
    seed: int | None = None
    train_images: int | None = None
    test_images: int | None = None


def final_row(workdir: str | os.PathLike) -> Row:
    """The row of a train_final.py work directory."""
    report = json.loads((pathlib.Path(workdir) / RESULT_FILE).read_text())
    result, mem = report["result"], report["memory"]
    return Row(name=report["name"], kind=report["kind"], accuracy=result["test_accuracy"],
               accuracy_of=f"test, {result['epochs_done']} epochs",
               param_bytes=mem["param_bytes"], working_bytes=mem["working_bytes"],
               total_bytes=mem["total_bytes"], epochs=result["epochs_done"],
               wall_seconds=result["wall_seconds"], device_arena_bytes=device_arena(report),
               width=(report["config"]["skeleton"]["width"] if report["kind"] == "searched"
                      else None), param_count=mem.get("param_count"), seed=report.get("seed"),
               **_data_sizes(report))


def _data_sizes(report: dict) -> dict:
    """Training and test images of a train_final.py report (older reports: from its config,
    CIFAR-10's 50,000 / 10,000 less the validation split and subsets)."""
    if "data" in report:
        return report["data"]
    data = report["config"]["data"]
    train = 50_000 - data.get("validation_size", 0)
    return dict(train_images=min(train, data.get("train_subset") or train),
                test_images=min(10_000, data.get("test_subset") or 10_000))


def device_arena(report: dict) -> int | None:
    """TFLite Micro's arena head for the network of a train_final.py report, measured by
    exporting it (`accounting` "tflm"); None without the deploy extra."""
    import importlib.util
    if importlib.util.find_spec("tflite_micro") is None:
        return None
    import ml_collections

    from memnas_jax import accounting, baselines, network
    from memnas_jax import data as data_lib
    from memnas_jax import train as train_lib
    from memnas_jax.encoding import Architecture
    config = ml_collections.ConfigDict(report["config"])
    if report.get("baseline"):
        model, image_shape = baselines.baseline_model(report["baseline"]), (32, 32, 3)
    else:
        dataset = data_lib.load_dataset(config.data)
        skeleton = train_lib.skeleton_from_config(config, dataset)
        model = network.MemNASNetwork(Architecture.from_json(json.dumps(report["architecture"])),
                                      skeleton)
        image_shape = dataset.image_shape
    return accounting.measure(model, image_shape, "tflm").working_bytes


SEARCH_KIND, CONTROL_KIND = "search candidate", "random-search candidate"


def search_rows(search_dir: str | os.PathLike, kind: str = SEARCH_KIND) -> list[Row]:
    """The search's Pareto front (proxy accuracy, the search's own memory model), answer first;
    `kind` CONTROL_KIND for a random-search control (`search.ranking = "random"`)."""
    best = json.loads((pathlib.Path(search_dir) / "best.json").read_text())
    answer = best.get("best")
    records = [answer] if answer else []
    records += [r for r in best.get("pareto_front", [])
                if not answer or r["hash"] != answer["hash"]]
    prefix = "" if kind == SEARCH_KIND else "random "
    return [Row(name=f"{prefix}{'answer' if i == 0 and answer else 'front'} {r['hash'][:10]} "
                     f"(round {r.get('round')})",
                kind=kind, accuracy=r.get("accuracy"),
                accuracy_of="validation (proxy training)", param_bytes=r["param_bytes"],
                working_bytes=r["working_bytes"], total_bytes=r["total_bytes"], epochs=None,
                wall_seconds=None) for i, r in enumerate(records)]


def gather(search_dir: str | os.PathLike | None, final_dirs: Sequence[str | os.PathLike],
           control_dir: str | os.PathLike | None = None) -> list[Row]:
    rows = [final_row(d) for d in final_dirs]
    if search_dir is not None:
        rows += search_rows(search_dir)
    if control_dir is not None:
        rows += search_rows(control_dir, CONTROL_KIND)
    return rows


FINAL_KINDS = ("searched", "baseline")  # rows of a final training, on the test set


@dataclasses.dataclass(frozen=True)
class SeedSummary:
    """One network's final trainings across seeds: the mean test accuracy and its spread.
    Memory does not depend on the seed (one architecture, one accounting)."""

    name: str
    kind: str
    seeds: tuple[int | None, ...]
    accuracies: tuple[float, ...]
    total_bytes: int
    device_arena_bytes: int | None

    @property
    def mean(self) -> float:
        return statistics.fmean(self.accuracies)

    @property
    def std(self) -> float | None:
        """Sample standard deviation (n - 1); None for a single seed."""
        return statistics.stdev(self.accuracies) if len(self.accuracies) > 1 else None


def seed_summaries(rows: Sequence[Row]) -> list[SeedSummary]:
    """The final-training rows grouped by network (name and kind), in first-seen order."""
    groups: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        if r.kind in FINAL_KINDS and r.accuracy is not None:
            groups.setdefault((r.name, r.kind), []).append(r)
    summaries = []
    for (name, kind), runs in groups.items():
        if len({(r.total_bytes, r.param_bytes) for r in runs}) != 1:
            raise ValueError(f"the runs named {name!r} differ in memory: they are not one "
                             "network; give each network's runs one name")
        summaries.append(SeedSummary(
            name=name, kind=kind, seeds=tuple(r.seed for r in runs),
            accuracies=tuple(r.accuracy for r in runs), total_bytes=runs[0].total_bytes,
            device_arena_bytes=runs[0].device_arena_bytes))
    return summaries


def seeds_markdown(summaries: Sequence[SeedSummary]) -> str:
    """Markdown: mean test accuracy and spread per network; empty unless a network has several
    seeds."""
    if not any(len(s.seeds) > 1 for s in summaries):
        return ""
    lines = ["## Across seeds", "",
             "Mean test accuracy over the seeds run, sample standard deviation (n - 1) and the "
             "range.", "",
             "| network | kind | seeds | mean | std | min - max | total MB | device arena MB |",
             "|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        seeds = ", ".join("-" if x is None else str(x) for x in s.seeds)
        lines.append(
            f"| {s.name} | {s.kind} | {seeds} | {_percent(s.mean, 100)} | "
            f"{_fmt(None if s.std is None else 100 * s.std, '.2f')} | "
            f"{100 * min(s.accuracies):.2f} - {100 * max(s.accuracies):.2f} | "
            f"{_fmt(s.total_bytes, '.3f', MB)} | {_fmt(s.device_arena_bytes, '.3f', MB)} |")
    return "\n".join(lines) + "\n"


def _dominated(point: dict, others: Sequence[dict]) -> bool:
    """Whether another point is at least as accurate and as small, and better in one."""
    return any(o["accuracy"] >= point["accuracy"] and o["total_bytes"] <= point["total_bytes"]
               and (o["accuracy"], -o["total_bytes"]) != (point["accuracy"],
                                                           -point["total_bytes"])
               for o in others)


def search_against_control(search_dir: str | os.PathLike, control_dir: str | os.PathLike
                           ) -> str:
    """Markdown: a search's answer and Pareto front against its random-search control's (the
    same candidates generated, the same number trained, chosen at random after the fully
    trained rounds), on the proxy accuracy and the search's memory model."""
    searches = {}
    for name, folder in (("controller", search_dir), ("random", control_dir)):
        best = json.loads((pathlib.Path(folder) / "best.json").read_text())
        searches[name] = (best, [r for r in best.get("pareto_front", [])
                                 if r.get("accuracy") is not None])
    lines = ["## The search against its random-search control", "",
             "| ranking | trained | rounds | answer | proxy acc | reward vs its base | "
             "total MB | front points | of them dominated by the other's front |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, (best, front) in searches.items():
        other = searches["random" if name == "controller" else "controller"][1]
        answer = best.get("best") or {}
        lines.append(
            f"| {name} | {best.get('num_trained')} | {best.get('rounds_done')} | "
            f"{answer.get('hash', '-')[:10]} | {_percent(answer.get('accuracy'), 100)} | "
            f"{_fmt(answer.get('reward'), '+.4f')} | "
            f"{_fmt(answer.get('total_bytes'), '.3f', MB)} | {len(front)} | "
            f"{sum(_dominated(p, other) for p in front)} |")
    return "\n".join(lines) + "\n"


def _fmt(x, spec: str, scale: float = 1.0) -> str:
    if x is None:
        return "-"
    return format(x / scale if scale != 1.0 else x, spec)


def _percent(x: float | None, scale: float) -> str:
    return "-" if x is None else f"{scale * x:.{2 if scale == 100 else 1}f} %"


def record(row: Row) -> dict:
    """The machine-readable row of results.json."""
    return dict(name=row.name, kind=row.kind, width=row.width, params=row.param_count,
                test_accuracy=row.accuracy if row.kind in FINAL_KINDS else None,
                accuracy=row.accuracy, accuracy_of=row.accuracy_of, test_images=row.test_images,
                train_images=row.train_images, epochs=row.epochs, seed=row.seed,
                param_bytes=row.param_bytes, working_bytes=row.working_bytes,
                total_bytes=row.total_bytes, device_arena_bytes=row.device_arena_bytes,
                wall_s=row.wall_seconds)


def markdown(rows: Sequence[Row], title: str = "Results") -> str:
    lines = [f"# {title}", "",
             "Memory: parameters (float32) plus the peak of live activations at batch 1 "
             "(`memory.analyze`, paper convention), in MB (1e6 bytes). Device arena: the "
             "activation arena TFLite Micro plans for the network exported to LiteRT (float32, "
             "batch 1), measured in the runtime (accounting `tflm`).", "",
             "| network | kind | seed | accuracy | of | param MB | working MB | total MB | "
             "device arena MB | epochs | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r.name} | {r.kind} | {_fmt(r.seed, 'd')} | {_percent(r.accuracy, 100)} | "
            f"{r.accuracy_of} | {_fmt(r.param_bytes, '.3f', MB)} | "
            f"{_fmt(r.working_bytes, '.3f', MB)} | {_fmt(r.total_bytes, '.3f', MB)} | "
            f"{_fmt(r.device_arena_bytes, '.3f', MB)} | "
            f"{_fmt(r.epochs, 'd')} | {_fmt(r.wall_seconds, '.0f')} |")
    seeds = seeds_markdown(seed_summaries(rows))
    if seeds:
        lines += ["", seeds.rstrip("\n")]
    lines += ["", "As published (MemNAS paper, CIFAR-10; their accounting, not ours):", "",
              "| network | total MB | param MB | top-1 |", "|---|---|---|---|"]
    for name, total, param, top1 in PUBLISHED:
        lines.append(f"| {name} | {total} | {param} | {_percent(top1, 1)} |")
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[Row], path: str | os.PathLike, title: str = "") -> None:
    """Accuracy against total memory: our networks filled, the published points hollow."""
    fig, ax = pyplot().subplots(figsize=(7, 5))
    styles = {"searched": ("o", "tab:red"), "baseline": ("s", "tab:blue"),
              SEARCH_KIND: (".", "tab:gray"), CONTROL_KIND: ("x", "tab:olive")}
    summaries = seed_summaries(rows)
    for kind, (marker, color) in styles.items():
        if kind in FINAL_KINDS:  # one point per network: the mean over seeds, bars the range
            chosen = [s for s in summaries if s.kind == kind]
            if not chosen:
                continue
            means = [100 * s.mean for s in chosen]
            ax.errorbar([s.total_bytes / MB for s in chosen], means,
                        yerr=[[m - 100 * min(s.accuracies) for m, s in zip(means, chosen)],
                              [100 * max(s.accuracies) - m for m, s in zip(means, chosen)]],
                        fmt=marker, color=color, label=kind, zorder=3, capsize=3)
            for s, m in zip(chosen, means):
                label = s.name + (f" ({len(s.seeds)} seeds)" if len(s.seeds) > 1 else "")
                ax.annotate(label, (s.total_bytes / MB, m), fontsize=8, xytext=(4, 4),
                            textcoords="offset points")
            continue
        chosen = [r for r in rows if r.kind == kind and r.accuracy is not None]
        if chosen:
            ax.scatter([r.total_bytes / MB for r in chosen], [100 * r.accuracy for r in chosen],
                       marker=marker, color=color, label=kind, zorder=3)
    published = [p for p in PUBLISHED if p[3] is not None]
    ax.scatter([p[1] for p in published], [p[3] for p in published], facecolors="none",
               edgecolors="black", label="as published (their accounting)", zorder=2)
    offsets = [(-4, 8), (4, -14), (-4, -26), (4, 8)]  # the published points sit close together
    for (name, total, _, top1), (dx, dy) in zip(published, offsets):
        ax.annotate(f"{name} (as published)", (total, top1), fontsize=7, color="dimgray",
                    xytext=(dx, dy), textcoords="offset points", ha="right" if dx < 0 else "left")
    ax.set_xscale("log")
    ax.margins(y=0.12)
    ax.set_xlabel("total memory, MB (parameters + peak activations, batch 1)")
    ax.set_ylabel("top-1 accuracy, %")
    ax.set_title(title or "Accuracy against total memory")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def write(rows: Sequence[Row], out_dir: str | os.PathLike, title: str = "Results",
          extra_markdown: str = "") -> None:
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "results.md", markdown(rows, title)
                 + (f"\n{extra_markdown}" if extra_markdown else ""))
    atomic_write(out / "results.json", json.dumps([record(r) for r in rows], indent=1) + "\n")
    plot(rows, out / "results.png", title)


__all__ = ["CONTROL_KIND", "FINAL_KINDS", "PUBLISHED", "RESULT_FILE", "Row", "SEARCH_KIND",
           "SeedSummary", "device_arena", "final_row", "gather", "markdown", "plot", "record",
           "search_against_control", "search_rows", "seed_summaries", "seeds_markdown", "write"]
