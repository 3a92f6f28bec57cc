"""Search throughput: candidates per hour of one real search round, and where the time goes.

    python benchmarks/search_throughput.py --preset smoke --round 0 --candidates 5
    python benchmarks/search_throughput.py --preset smoke --round 1 --base_cells 4
    python benchmarks/search_throughput.py --preset test --candidates 3 --epochs 1   # CI-sized

It takes the candidates of one round of a `experiments/configs/cifar10.py` preset (round 0: the
single-cell networks; round >= 1: the grows and trims of a base with `--base_cells` cells per
block), a seeded sample of `--candidates` of them, and trains them through the search's own
path (`search.CandidateTrainer` and `compile_ahead.CompileAhead`, as `run_search` does with one
candidate group), once per mode, each mode in a fresh process:

* sequential: compile each candidate when its training starts, no persistent cache (the
  reference: the search before compile-ahead);
* ahead: compile the next candidates in background threads while one trains
  (`--compile_ahead`, default the search's "auto"), persistent cache in a fresh directory (what
  a new search does);
* warm: the same with the cache the "ahead" run filled (a resumed or repeated search, and a
  later round meeting the same programs);
* tuned: the same cache with its executables deleted and XLA's per-fusion autotune results
  (GPU) kept, at the same absolute path (JAX puts that path into the compile options): what a
  new candidate costs on a host that has searched before (on a CPU, where nothing is autotuned,
  this is "ahead" again);
* packed (`--packing K`, -1 = the search's auto size): the round's candidates as one template
  (`memnas_jax.packed`), compiled once, the sample trained in packs of K, with a fresh cache
  (`--pack_selection`: "select" vmaps the pack, "switch" runs one candidate's ops only).

The candidates train in the search's order (`search.training_order`: first a few that use
every op, so that their autotune results serve the rest), or with `--order sample` in the
sample's.

Per candidate it prints compile seconds (in whichever thread compiled it), the seconds training
waited for its programs, training seconds (the epochs' steps), other seconds (init, evaluation,
transfers, bookkeeping) and the wall seconds between one candidate's end and the next. Totals:
candidates per hour, the compile + overhead share of the wall time (1 - training / wall), summed
training images/s and the fraction of the hardware's peak (XLA's FLOP count of the train step).
The last line is `RESULT {json}` for the last mode, with the first mode as `reference`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "experiments"))  # the presets: experiments/configs

MODES = ("sequential", "ahead", "warm", "tuned", "packed")
# Dense peak in TFLOP/s by (backend, compute dtype): this project's 2-core AMD EPYC (fp32 FMA,
# train_throughput.py) and an NVIDIA H200 SXM (bf16 tensor cores / fp32 without them, from
# NVIDIA's data sheet); --peak_tflops for other hardware.
PEAK_TFLOPS = {("cpu", "float32"): 0.234, ("cpu", "bfloat16"): 0.234,
               ("gpu", "bfloat16"): 989.0, ("gpu", "float32"): 67.0}


def _config(args):
    from configs import cifar10
    config = cifar10.get_config(args.preset)
    if args.epochs:
        config.train.epochs = args.epochs
    if args.train_subset:
        config.data.train_subset = args.train_subset
    if args.validation_subset:
        config.data.validation_subset = args.validation_subset
    if args.validation_size is not None:
        config.data.validation_size = args.validation_size
    if args.width:
        config.skeleton.width = args.width
    config.train.eval_compiler_options = args.eval_compiler_options
    return config


def base_architecture(cells: int, ops, num_blocks: int):
    """A base of `cells` cells in every block: cell j reads cell j-1 and the block input, with
    the preset's ops in turn, only the last cell linked (a chain, as grown by the search)."""
    from memnas_jax.encoding import Cell, uniform_architecture
    ops = list(ops)
    chain = [Cell(j, 0, ops[(2 * j) % len(ops)], ops[(2 * j + 1) % len(ops)],
                  linked=j == cells - 1) for j in range(cells)]
    return uniform_architecture(chain, num_blocks)


def round_candidates(config, skeleton, round_index: int, base_cells: int, count: int,
                     everyone: bool = False):
    """A seeded sample of `count` candidates of the round (the search's own generators), or
    with `everyone` (all of the round, the sample) ."""
    from memnas_jax import search
    from memnas_jax.grow_trim import generate_candidates, initial_candidates
    options = search.SearchSettings.from_config(config).grow_trim_options(round_index)
    if round_index == 0:
        candidates = initial_candidates(skeleton.num_blocks, options)
    else:
        base = base_architecture(base_cells, config.grow_trim.ops, skeleton.num_blocks)
        candidates = generate_candidates(base, options)
    chosen = search.seeded_sample([c.arch_hash for c in candidates], count, config.seed,
                                  round_index)
    sample = [candidates[i] for i in chosen]
    return (candidates, sample) if everyone else sample


def worker(spec: dict) -> dict:
    """One mode, in this (fresh) process: trains the candidates and times them."""
    from memnas_jax import xla_flags
    xla_flags.disable_cpu_ynn_fusions()  # as the search mains do
    import jax

    from memnas_jax import data as data_lib
    from memnas_jax import search, train
    from memnas_jax.compile_ahead import CompileAhead, resolve_depth

    args = argparse.Namespace(**spec["args"])
    config = _config(args)
    with config.unlocked():
        config.train.compilation_cache_dir = spec["cache_dir"]
    dataset = data_lib.load_dataset(config.data)
    dataset = dataclasses.replace(dataset, test=None)  # as the search: selection on validation
    skeleton = train.skeleton_from_config(config, dataset)
    candidates = round_candidates(config, skeleton, args.round, args.base_cells,
                                  args.candidates)
    if args.order == "search":
        candidates = [candidates[k] for k in search.training_order(
            [c.architecture for c in candidates])]
    trainer = search.CandidateTrainer(search.SearchSettings.from_config(config), dataset,
                                      pathlib.Path(spec["workdir"]))
    depth = resolve_depth(spec["compile_ahead"])
    rows = []
    start = last = time.perf_counter()
    if spec["mode"] == "packed":
        rows, depth = _packed_rows(args, config, skeleton, trainer), spec["pack_size"]
    else:
        with CompileAhead(lambda c: trainer.compile(c.architecture, skeleton),
                          candidates, depth) as ahead:
            for c in candidates:
                programs = ahead.take(c)
                extra = {} if programs is None else {"programs": programs}
                result = trainer(c.architecture, skeleton,
                                 search.candidate_key(config.seed, c.arch_hash), **extra)
                now = time.perf_counter()
                train_s = sum(result.epoch_seconds)
                rows.append(dict(
                    hash=c.arch_hash[:10], description=c.describe(), status=result.status,
                    cells=max(c.architecture.cells_per_block), compile_s=result.compile_seconds,
                    wait_s=result.compile_wait_seconds, train_s=train_s,
                    other_s=now - last - train_s - result.compile_wait_seconds, wall_s=now - last,
                    accuracy=result.best_val_accuracy, images_per_s=result.images_per_second,
                    flops_per_image=result.train_flops_per_image))
                _stream_row(spec["mode"], rows[-1])
                last = now
    wall = time.perf_counter() - start
    train = sum(r["train_s"] for r in rows)
    images = sum(r["images_per_s"] * r["train_s"] for r in rows)
    flops = sum((r["flops_per_image"] or 0.0) * r["images_per_s"] * r["train_s"] for r in rows)
    dtype = config.train.dtype
    peak = args.peak_tflops or PEAK_TFLOPS.get((jax.default_backend(), dtype))
    return dict(
        mode=spec["mode"], backend=jax.default_backend(), device=jax.devices()[0].device_kind,
        compile_ahead=depth, candidates=len(rows), wall_s=wall,
        candidates_per_hour=3600 * len(rows) / wall,
        compile_s=sum(r["compile_s"] for r in rows),
        compile_wait_s=sum(r["wait_s"] for r in rows), train_s=train,
        overhead_share=1 - train / wall, images_per_s=images / train if train else 0.0,
        peak_fraction=(flops / train / (peak * 1e12)) if train and peak else None,
        dtype=dtype, epochs=config.train.epochs, train_images=len(dataset.train),
        failed=sum(r["status"] != "ok" for r in rows), rows=rows)


def _stream_row(mode: str, row: dict) -> None:
    """One candidate's row as it ends (`ROW {json}`, flushed): a mode killed by a timeout
    still leaves the candidates it finished in the log."""
    print("ROW " + json.dumps(dict(mode=mode, **row)), flush=True)


def _packed_rows(args, config, skeleton, trainer) -> list[dict]:
    """The packed mode: one template for the whole round, the sample trained in packs."""
    import jax

    from memnas_jax import search
    from memnas_jax.template import RoundTemplate
    everyone, sample = round_candidates(config, skeleton, args.round, args.base_cells,
                                        args.candidates, everyone=True)
    size = args.packing if args.packing > 0 else (
        1 if jax.default_backend() == "cpu" else min(search.AUTO_MAX_PACK, len(sample)))
    start = time.perf_counter()
    template = RoundTemplate.from_architectures([c.architecture for c in everyone], skeleton)
    programs = trainer.compile_pack(template, size, args.pack_selection)
    compile_s = time.perf_counter() - start
    size, rows, last = programs.pack_size, [], time.perf_counter()
    for first in range(0, len(sample), size):
        pack = sample[first:first + size]
        results = trainer.train_pack(
            [c.architecture for c in pack], skeleton,
            [search.candidate_key(config.seed, c.arch_hash) for c in pack], programs)
        now = time.perf_counter()
        share = (now - last) / len(pack)
        for c, result in zip(pack, results):
            train_s = sum(result.epoch_seconds) / len(pack)
            compile_share = compile_s / len(sample)
            rows.append(dict(
                hash=c.arch_hash[:10], description=c.describe(), status=result.status,
                cells=max(c.architecture.cells_per_block), compile_s=compile_share,
                wait_s=compile_share if first == 0 else 0.0, train_s=train_s,
                other_s=share - train_s, wall_s=share + (compile_share if first == 0 else 0.0),
                accuracy=result.best_val_accuracy,
                # its images over its share of the pack's time: summed rows give the pack's
                images_per_s=result.images_per_second * len(pack),
                flops_per_image=result.train_flops_per_image))
            _stream_row("packed", rows[-1])
        last = now
    return rows


def _cache_files(cache: str) -> dict:
    """Files in the compilation cache: JAX's executables, and XLA's per-fusion autotune
    results (GPU) in the folder JAX names after the XLA option."""
    files = [p for p in pathlib.Path(cache).rglob("*") if p.is_file()]
    return dict(cache_files=len(files),
                autotune_cache_files=sum("autotune" in str(p.parent) for p in files))


def _keep_autotune_results_only(cache: str) -> None:
    """Deletes the cache's executables, keeping XLA's per-fusion autotune results in place."""
    for path in pathlib.Path(cache).rglob("*"):
        if path.is_file() and "autotune" not in str(path.parent):
            path.unlink()


def _print_mode(result: dict) -> None:
    print(f"\n## {result['mode']} ({result['backend']}, {result['device']}; compile ahead "
          f"{result['compile_ahead']}; {result['epochs']} epochs on {result['train_images']} "
          "images)\n")
    print("| # | candidate | cells | compile s | waited s | train s | other s | wall s | "
          "val acc |")
    print("|---|---|---|---|---|---|---|---|---|")
    for i, r in enumerate(result["rows"]):
        acc = "failed" if r["accuracy"] is None else f"{100 * r['accuracy']:.1f} %"
        print(f"| {i + 1} | {r['description'][:48]} | {r['cells']} | {r['compile_s']:.1f} | "
              f"{r['wait_s']:.1f} | {r['train_s']:.1f} | {r['other_s']:.1f} | "
              f"{r['wall_s']:.1f} | {acc} |")
    peak = result["peak_fraction"]
    cache = ("" if "cache_files" not in result else
             f"; compilation cache: {result['cache_files']} files, "
             f"{result['autotune_cache_files']} of them autotune results")
    print(f"\n{result['candidates']} candidates in {result['wall_s']:.1f} s: "
          f"{result['candidates_per_hour']:.0f} candidates/hour; compile {result['compile_s']:.1f}"
          f" s (waited for {result['compile_wait_s']:.1f} s), training {result['train_s']:.1f} s"
          f"; compile + overhead {100 * result['overhead_share']:.0f} % of the wall time; "
          f"{result['images_per_s']:.0f} training images/s"
          + ("" if peak is None else f", {100 * peak:.2f} % of the {result['dtype']} peak")
          + cache)


def _run_worker(spec: dict, env: dict, tmp: str) -> tuple[int, list[str], str]:
    """Runs one mode's worker, passing its `ROW` lines through as they come."""
    err_path = os.path.join(tmp, f"{spec['mode']}.stderr")
    with open(err_path, "w") as err:
        proc = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)],
                                cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=err, text=True,
                                env=env)
        lines = []
        for line in proc.stdout:
            if line.startswith("ROW "):
                print(line, end="", flush=True)
            elif line.startswith("WORKER "):
                lines.append(line)
        returncode = proc.wait()
    return returncode, lines, pathlib.Path(err_path).read_text()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--preset", default="smoke", help="cifar10.py preset")
    parser.add_argument("--round", type=int, default=0, help="0: round 0; >= 1: a grown round")
    parser.add_argument("--base_cells", type=int, default=4,
                        help="cells per block of the base of a grown round")
    parser.add_argument("--candidates", type=int, default=5, help="candidates to train")
    parser.add_argument("--epochs", type=int, default=0, help="epochs (0: the preset's)")
    parser.add_argument("--train_subset", type=int, default=0,
                        help="training images (0: the preset's)")
    parser.add_argument("--validation_subset", type=int, default=0,
                        help="validation images (0: the preset's)")
    parser.add_argument("--validation_size", type=int, default=None,
                        help="images held out of the training set for validation (default: "
                        "the preset's)")
    parser.add_argument("--width", type=int, default=0, help="block width (0: the preset's)")
    parser.add_argument("--compile_ahead", type=int, default=-1,
                        help="depth of the ahead/warm modes (-1: the search's auto)")
    parser.add_argument("--xla_flags", default="",
                        help="appended to XLA_FLAGS in every mode (e.g. "
                        "--xla_gpu_autotune_level=2)")
    parser.add_argument("--eval_compiler_options", default="",
                        help="train.eval_compiler_options, e.g. xla_gpu_autotune_level=0")
    parser.add_argument("--cache_dir", default="",
                        help="the ahead/warm modes' compilation cache (default: a temporary "
                        "folder); an existing cache makes 'ahead' warm too")
    parser.add_argument("--peak_tflops", type=float, default=0.0,
                        help="the hardware's peak for the dtype (0: PEAK_TFLOPS)")
    parser.add_argument("--packing", type=int, default=0,
                        help="also run the packed mode with packs of this size (-1: the "
                        "search's auto size; 0: not)")
    parser.add_argument("--pack_selection", default="auto",
                        help="packed mode: select, switch (pack size 1) or auto")
    parser.add_argument("--order", default="search", choices=("search", "sample"),
                        help="training order: the search's (every op first) or the sample's")
    parser.add_argument("--modes", default=",".join(MODES[:3]),
                        help=f"comma-separated, from {MODES}; the first is the reference")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("WORKER " + json.dumps(worker(json.loads(args.worker))))
        return
    modes = [m for m in args.modes.split(",") if m]
    if args.packing and "packed" not in modes:
        modes.append("packed")
    if not modes or set(modes) - set(MODES):
        parser.error(f"--modes must name some of {MODES}, got {args.modes!r}")
    spec_args = {k: v for k, v in vars(args).items() if k not in ("worker", "modes")}
    env = dict(os.environ)  # the package installed, or PYTHONPATH kept (the GPU image's wheels)
    if args.xla_flags:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {args.xla_flags}".strip()
    results = []
    with tempfile.TemporaryDirectory(prefix="search_throughput_") as tmp:
        cache = args.cache_dir or os.path.join(tmp, "xla_cache")
        for mode in modes:
            spec = dict(args=spec_args, mode=mode, workdir=os.path.join(tmp, mode),
                        cache_dir={"sequential": "", "packed": os.path.join(tmp, "packed_cache")
                                   }.get(mode, cache),
                        compile_ahead=0 if mode == "sequential" else args.compile_ahead,
                        pack_size=args.packing)
            if mode == "tuned":
                _keep_autotune_results_only(cache)
            returncode, lines, stderr = _run_worker(spec, env, tmp)
            if returncode or not lines:
                sys.exit(f"mode {mode} failed (exit {returncode}):\n{stderr[-4000:]}")
            results.append(json.loads(lines[-1][len("WORKER "):]))
            if mode != "sequential":
                results[-1].update(_cache_files(spec["cache_dir"]))
            _print_mode(results[-1])
    final, reference = results[-1], results[0]
    summary = {k: final.get(k) for k in (
        "backend", "device", "mode", "compile_ahead", "candidates", "wall_s",
        "candidates_per_hour", "compile_s", "train_s", "overhead_share", "images_per_s",
        "peak_fraction", "cache_files", "autotune_cache_files")}
    summary.update(preset=args.preset, round=args.round, epochs=final["epochs"],
                   train_images=final["train_images"], xla_flags=args.xla_flags,
                   order=args.order, modes={r["mode"]: {k: r[k] for k in (
                       "candidates_per_hour", "wall_s", "compile_s", "compile_wait_s")}
                       for r in results})
    if len(results) > 1:
        print("\n| mode | candidates/hour | wall s | compile s | waited s | train s | "
              "overhead | speed-up |")
        print("|---|---|---|---|---|---|---|---|")
        for r in results:
            print(f"| {r['mode']} | {r['candidates_per_hour']:.0f} | {r['wall_s']:.1f} | "
                  f"{r['compile_s']:.1f} | {r['compile_wait_s']:.1f} | {r['train_s']:.1f} | "
                  f"{100 * r['overhead_share']:.0f} % | "
                  f"{r['candidates_per_hour'] / reference['candidates_per_hour']:.2f}x |")
        summary["reference"] = {k: reference[k] for k in ("mode", "wall_s",
                                                          "candidates_per_hour", "compile_s",
                                                          "train_s", "overhead_share")}
        summary["speedup"] = final["candidates_per_hour"] / reference["candidates_per_hour"]
    print("RESULT " + json.dumps(summary, sort_keys=True))


if __name__ == "__main__":
    main()
