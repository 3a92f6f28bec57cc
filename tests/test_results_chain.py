"""The results chain at CPU scale, through the real mains: a search, the final training of its
answer and of a baseline with the same recipe, and the comparison (results.md, results.png)."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from memnas_jax import accounting, baselines, comparison

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO_ROOT / "experiments"


def _run(script, *argv, env):
    proc = subprocess.run([sys.executable, str(EXPERIMENTS / script), *map(str, argv)],
                          capture_output=True, text=True, env=env, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_baselines_have_the_published_parameter_counts():
    import jax
    import jax.numpy as jnp
    counts = {}
    for name in baselines.BASELINES:
        model = baselines.baseline_model(name)
        variables = jax.eval_shape(lambda m=model: m.init(jax.random.key(0),
                                                          jnp.zeros((1, 32, 32, 3))))
        counts[name] = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))
    # He et al.'s CIFAR ResNets (shortcut A) and MobileNetV2 with a 10-way head at 32 px.
    assert counts == {"resnet8": 75_290, "resnet14": 172_506, "resnet20": 269_722,
                      "resnet56": 853_018, "resnet110": 1_727_962,
                      "mobilenetv2": 2_236_682}
    with pytest.raises(ValueError, match="unknown baseline 'vgg16'"):
        baselines.baseline_model("vgg16")


def test_named_accountings_of_resnet20():
    """ResNet-20's stage 1 holds two 32 x 32 x 16 float32 maps at its peak (the block input for
    the shortcut and the op being computed); strict adds the op's input; 16 images, 16 times."""
    model = baselines.baseline_model("resnet20")
    fmap = 32 * 32 * 16 * 4
    have_deploy = importlib.util.find_spec("tflite_micro") is not None
    m = {a: accounting.measure(model, (32, 32, 3), a) for a in accounting.ACCOUNTINGS
         if a != "tflm" or have_deploy}
    assert m["liveness"].working_bytes == 2 * fmap
    if have_deploy:  # measured in TFLite Micro: strict's three maps and a padded copy (stride 2)
        assert m["tflm"].working_bytes == 270_592 == 3 * fmap + 16 * 34 * 34 * 4
    assert m["liveness_strict_b16"].working_bytes == 16 * 3 * fmap
    # stem + 6 convs at 32 px, 6 at 16 px, 6 at 8 px, and the 10 logits
    assert m["layer_outputs"].working_bytes == 7 * fmap + 6 * fmap // 2 + 6 * fmap // 4 + 40
    assert 3 * m["layer_outputs"].working_bytes < m["training_activations"].working_bytes
    assert {x.param_bytes for x in m.values()} == {4 * 269_722}
    assert m["liveness"].total_bytes == 4 * 269_722 + 2 * fmap
    with pytest.raises(ValueError, match="unknown accounting"):
        accounting.measure(model, (32, 32, 3), "vibes")


@pytest.mark.slow
def test_search_final_training_baseline_and_comparison(data_dir, tmp_path):
    env = dict(os.environ, MEMNAS_DATA_DIR=str(data_dir))
    search_dir, final_dir, base_dir, out = (tmp_path / n for n in ("search", "final", "resnet20",
                                                                   "results"))
    _run("cifar10_search.py", f"--config={EXPERIMENTS / 'configs' / 'cifar10.py'}:test",
         f"--workdir={search_dir}", "--config.search.max_rounds=2",
         "--config.output.progress_bar=false", env=env)
    recipe = [f"--config={EXPERIMENTS / 'configs' / 'train_final.py'}:smoke",
              "--config.epochs=1", "--config.data.train_subset=1000",
              "--config.data.test_subset=500", "--host_devices=1"]
    _run("train_final.py", f"--arch={search_dir / 'best_architecture.json'}",
         f"--workdir={final_dir}", *recipe, env=env)
    _run("train_final.py", "--baseline=resnet20", f"--workdir={base_dir}", *recipe, env=env)
    report = json.loads((base_dir / "result.json").read_text())
    assert report["kind"] == "baseline" and report["result"]["param_count"] == 269_722
    # One accounting: float32 parameters + the batch-1 liveness peak of the inference pass.
    assert report["memory"]["param_bytes"] == 4 * 269_722
    assert report["memory"]["working_bytes"] == 2 * 32 * 32 * 16 * 4  # ResNet stage 1: 2 maps
    proc = _run("compare.py", f"--search={search_dir}", f"--final={final_dir},{base_dir}",
                f"--out={out}", env=env)
    table = (out / "results.md").read_text()
    assert table in proc.stdout + "\n" or table.strip() in proc.stdout
    rows = comparison.gather(search_dir, [final_dir, base_dir])
    assert [r.kind for r in rows[:2]] == ["searched", "baseline"]
    assert rows[2].name.startswith("answer") and all(r.accuracy is not None for r in rows)
    for row in rows[:2]:
        seed = "-" if row.seed is None else row.seed
        assert (f"| {row.name} | {row.kind} | {seed} | {100 * row.accuracy:.2f} % "
                "| test, 1 epochs |") in table
    assert "As published" in table and "| ResNet-56 | 6.7 | 3.4 | 93.0 % |" in table
    import matplotlib.image
    image = matplotlib.image.imread(out / "results.png")
    assert image.ndim == 3 and image.shape[0] > 400


def test_a_search_against_its_random_search_control(tmp_path):
    def point(h, acc, total, reward=None):
        return dict(hash=h * 10, accuracy=acc, total_bytes=total, param_bytes=total // 2,
                    working_bytes=total // 2, round=1, reward=reward)
    fronts = {"search": [point("a", 0.60, 200_000, 0.01), point("b", 0.50, 100_000)],
              "control": [point("c", 0.55, 250_000, -0.02), point("d", 0.40, 100_000)]}
    for name, front in fronts.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "best.json").write_text(json.dumps(dict(
            best=front[0], pareto_front=front, num_trained=26, rounds_done=4)))
    text = comparison.search_against_control(tmp_path / "search", tmp_path / "control")
    rows = [line for line in text.splitlines() if line.startswith(("| controller", "| random"))]
    assert rows[0] == ("| controller | 26 | 4 | aaaaaaaaaa | 60.00 % | +0.0100 | 0.200 | 2 | 0 |")
    # both control points are beaten: c by a (more accurate, smaller), d by b
    assert rows[1] == ("| random | 26 | 4 | cccccccccc | 55.00 % | -0.0200 | 0.250 | 2 | 2 |")
    control = comparison.search_rows(tmp_path / "control", comparison.CONTROL_KIND)
    assert [r.name for r in control] == ["random answer cccccccccc (round 1)",
                                         "random front dddddddddd (round 1)"]


def test_final_trainings_are_summarised_across_seeds(tmp_path):
    def run(name, kind, seed, accuracy, total=300_000):
        return comparison.Row(name=name, kind=kind, accuracy=accuracy,
                              accuracy_of="test, 10 epochs", param_bytes=total // 3,
                              working_bytes=total - total // 3,
                              total_bytes=total, epochs=10, wall_seconds=1.0, seed=seed,
                              device_arena_bytes=total)
    rows = [run("searched x", "searched", 0, 0.7496),
            run("resnet8", "baseline", 0, 0.7337, 432_000),
            run("searched x", "searched", 1, 0.7520),
            run("resnet8", "baseline", 1, 0.7301, 432_000),
            run("resnet20", "baseline", 0, 0.7791, 1_210_000)]
    searched, resnet8, resnet20 = comparison.seed_summaries(rows)
    assert searched.seeds == (0, 1) and searched.accuracies == (0.7496, 0.7520)
    assert searched.mean == pytest.approx(0.7508)
    assert searched.std == pytest.approx(0.0024 / 2 ** 0.5)  # two seeds: |a - b| / sqrt(2)
    assert resnet20.std is None and resnet20.seeds == (0,)
    text = comparison.markdown(rows)
    assert ("| searched x | searched | 0, 1 | 75.08 % | 0.17 | 74.96 - 75.20 | 0.300 | 0.300 |"
            in text)
    assert "| resnet20 | baseline | 0 | 77.91 % | - | 77.91 - 77.91 | 1.210 | 1.210 |" in text
    assert "| resnet8 | baseline | 1 | 73.01 % | test, 10 epochs |" in text  # each run stays
    assert comparison.seeds_markdown(comparison.seed_summaries(rows[:2])) == ""  # one seed each
    with pytest.raises(ValueError, match="differ in memory"):
        comparison.seed_summaries([run("n", "searched", 0, 0.5), run("n", "searched", 1, 0.5, 9)])
    comparison.plot(rows, tmp_path / "results.png")
    assert (tmp_path / "results.png").stat().st_size > 10_000
