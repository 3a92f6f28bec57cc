"""A randomised fault soak: the test-preset search (3 rounds, a controller round) SIGKILLed at 10
seeded random moments and resumed each time, then SIGTERMed twice, ends with the records of an
uninterrupted run, timing fields aside."""

import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import pytest
from test_experiments import CIFAR_CONFIG, _without_timing  # tests/ is on sys.path

from memnas_jax import preemption, search
from memnas_jax.search import reports

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
KILLS, TERMS, SEED = 10, 2, 0


def _argv(workdir, cache):
    return [sys.executable, str(REPO_ROOT / "experiments" / "cifar10_search.py"),
            f"--config={CIFAR_CONFIG}:test", f"--workdir={workdir}",
            "--config.output.progress_bar=false", f"--config.train.compilation_cache_dir={cache}",
            "--config.train.epochs=40"]  # a search long enough for 12 stops to land mid-run


@pytest.mark.slow
def test_random_kills_and_terms_end_with_the_uninterrupted_records(tmp_path):
    env = dict(os.environ)
    cache = tmp_path / "cache"
    start = time.perf_counter()
    subprocess.run(_argv(tmp_path / "whole", cache), env=env, check=True, capture_output=True,
                   timeout=900)
    whole_seconds = time.perf_counter() - start
    rng = random.Random(SEED)
    workdir = tmp_path / "soak"
    outcomes = []
    for signum in [signal.SIGKILL] * KILLS + [signal.SIGTERM] * TERMS:
        # A random moment: after a random number of trained epochs (the search logs each),
        # plus a random fraction of a second (into the next epoch, a save or a controller fit).
        target, delay = rng.randint(1, 12), rng.uniform(0.0, 0.5)
        proc = subprocess.Popen(_argv(workdir, cache), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        epochs = 0
        for line in proc.stderr:
            epochs += "] epoch " in line
            if epochs == target:
                time.sleep(delay)
                proc.send_signal(signum)
                break
        proc.communicate(timeout=120)
        outcomes.append(proc.returncode)
    # Every stop landed in a running search: 15 kills, then 2 graceful stops (exit 75).
    assert outcomes == [-signal.SIGKILL] * KILLS + [preemption.EXIT_PREEMPTED] * TERMS, outcomes
    subprocess.run(_argv(workdir, cache), env=env, check=True, capture_output=True, timeout=900)
    assert search.load_state(workdir).status == "finished"
    assert (_without_timing(reports.read_candidates(workdir))
            == _without_timing(reports.read_candidates(tmp_path / "whole")))
    print(f"soak outcomes: {outcomes}; uninterrupted search {whole_seconds:.0f} s")
