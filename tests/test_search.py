"""The search loop: selection, stopping, budget, failures, config binding and exact resume.

Most tests use a scripted trainer (an accuracy that is a fixed function of the architecture and
its training key, no network trained) so that whole multi-round searches run in seconds and the
loop's decisions can be checked exactly. tests/test_experiments.py runs real searches (real
training, a controller-ranked round, SIGKILL and resume).
"""

import dataclasses
import hashlib
import importlib.util
import json
import logging
import pathlib
import types

import jax
import numpy as np
import pytest

from memnas_jax import controller as controller_lib
from memnas_jax import search
from memnas_jax.errors import ConfigError
from memnas_jax.grow_trim import generate_candidates, initial_candidates
from memnas_jax.memory import memory_report
from memnas_jax.reward import RewardConfig, memory_efficient_reward
from memnas_jax.search import reports
from memnas_jax.train import TrainResult

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _preset(path: str, preset: str):
    spec = importlib.util.spec_from_file_location("config_under_test", REPO_ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(preset)


def _config(**search_overrides):
    """The CIFAR-10 test preset with every round fully trained (no controller: its fits take
    tens of seconds to compile; tests/test_experiments.py covers controller rounds)."""
    config = _preset("experiments/configs/cifar10.py", "test")
    config.search.update(dict(max_rounds=3, full_train_rounds=3, full_train_cap=4,
                              stop_when_no_improvement=True))
    config.search.update(search_overrides)
    config.output.update(dict(progress_bar=False, plots=False, tensorboard=False))
    return config


# Per-op accuracy bonus of the scripted trainer: conv_3x3 (6) helps most, max pool (1) a bit.
_OP_BONUS = {0: 0.01, 1: 0.02, 6: 0.05, None: 0.0}


class Interrupted(Exception):
    """Stands for a kill: raised by the scripted trainer after a number of trainings."""


@dataclasses.dataclass
class ScriptedTrainer:
    """Accuracy = 0.5 + op bonuses of block 1's cells + 0.05 x uniform(key): a pure function of
    the architecture and the key the search derives for it. `outcomes` maps a hash to
    "failed" / "diverged"; `interrupt_after` raises Interrupted at that call."""

    outcomes: dict = dataclasses.field(default_factory=dict)
    interrupt_after: int | None = None
    calls: list = dataclasses.field(default_factory=list)

    def accuracy(self, arch, key) -> float:
        bonus = sum(_OP_BONUS[c.op1] + _OP_BONUS[c.op2] for c in arch[0])
        return 0.5 + bonus + 0.05 * float(jax.random.uniform(key))

    def __call__(self, arch, skeleton, key) -> TrainResult:
        if self.interrupt_after is not None and len(self.calls) == self.interrupt_after:
            raise Interrupted()
        self.calls.append(arch.canonical_hash())
        status = self.outcomes.get(arch.canonical_hash(), "ok")
        failure = ""
        if status == "out_of_memory":
            status, failure = "failed", "out_of_memory"
        acc = self.accuracy(arch, key) if status == "ok" else None
        return TrainResult(
            status=status, failure=failure,
            message="" if status == "ok" else f"scripted {failure or status}",
            best_val_accuracy=acc, best_val_epoch=2 if acc else None, final_val_accuracy=acc,
            test_accuracy=None, loss_curve=(1.0,), val_accuracy_curve=(acc,),
            epochs_done=2 if acc else 0, resumed_from_epoch=0, param_count=0,
            wall_seconds=0.01, compile_seconds=0.0, images_per_second=1.0)


def _round0_options(config):
    return search.SearchSettings.from_config(config).grow_trim_options(0)


def _without_timing(records):
    return [{k: v for k, v in r.items() if k not in reports.TIMING_FIELDS} for r in records]


def _state(workdir):
    return search.load_state(pathlib.Path(workdir))


# ---------------------------------------------------------------------------------------------
# Seeds


def test_derive_seed_is_a_pure_function_of_its_parts():
    assert search.derive_seed(0, "train", "abc") == search.derive_seed(0, "train", "abc")
    assert search.derive_seed(0, "train", "abc") != search.derive_seed(1, "train", "abc")
    expected = int.from_bytes(hashlib.sha256(b"7/controller/3").digest()[:4], "little")
    assert search.derive_seed(7, "controller", 3) == expected & 0x7FFFFFFF


def test_seeded_sample_ignores_candidate_order():
    hashes = [c.arch_hash for c in initial_candidates()]
    chosen = search.seeded_sample(hashes, 5, seed=3, round_index=1)
    assert len(chosen) == 5 and chosen == sorted(chosen)
    reversed_hashes = hashes[::-1]
    chosen_rev = search.seeded_sample(reversed_hashes, 5, seed=3, round_index=1)
    assert {hashes[i] for i in chosen} == {reversed_hashes[i] for i in chosen_rev}
    assert search.seeded_sample(hashes, 5, seed=4, round_index=1) != chosen
    assert search.seeded_sample(hashes, 100, seed=3, round_index=1) == list(range(49))


# ---------------------------------------------------------------------------------------------
# Selection and stopping


def test_rounds_select_by_reward_against_the_previous_winner(tmp_path):
    config = _config(max_rounds=4)
    trainer = ScriptedTrainer()
    result = search.run_search(config, tmp_path, train_fn=trainer)
    state = _state(tmp_path)
    assert state.status == "finished" and result.finished
    reward_config = RewardConfig(**config.reward)
    base = None
    for rnd in state.rounds:
        entries = rnd.entries
        # The plan: the seeded sample of the grow-trim pool of the previous winner.
        options = search.SearchSettings.from_config(config).grow_trim_options(rnd.round)
        pool = (initial_candidates(5, options) if base is None
                else generate_candidates(base.architecture, options))
        chosen = search.seeded_sample([c.arch_hash for c in pool], 4, config.seed, rnd.round)
        assert [e.hash for e in entries] == [pool[i].arch_hash for i in chosen]
        assert rnd.num_generated == len(pool)
        assert (rnd.base and rnd.base.hash) == (base and base.hash)
        for e in entries:
            arch = e.architecture
            key = search.candidate_key(config.seed, e.hash)
            assert e.accuracy == trainer.accuracy(arch, key)
        ref = rnd.reference
        if base is None:  # round 0: median reference, winner = most accurate
            assert ref.accuracy == float(np.median([e.accuracy for e in entries]))
            winner = max(entries, key=lambda e: e.accuracy)
        else:
            assert (ref.accuracy, ref.param_bytes, ref.working_bytes) == (
                base.accuracy, base.param_bytes, base.working_bytes)
            winner = max(entries, key=lambda e: e.reward)
        for e in entries:
            expected = memory_efficient_reward(
                e.accuracy, e.param_bytes, e.working_bytes,
                base_accuracy=ref.accuracy, base_param_memory=ref.param_bytes,
                base_working_memory=ref.working_bytes, config=reward_config)
            assert e.reward == pytest.approx(float(expected), rel=1e-12)
        if base is not None and winner.reward <= 0:
            assert rnd.winner is None
            assert "improves on its base" in state.stop_reason
            break
        assert rnd.winner == winner.hash
        base = winner
    else:
        assert state.stop_reason == "round cap reached (4 rounds)"
    assert result.arch_hash == base.hash
    assert result.accuracy == base.accuracy
    assert len(trainer.calls) == result.num_trained == sum(
        len(r.entries) for r in state.rounds)
    assert result.architecture.canonical_hash() == result.arch_hash


def test_update_hooks_see_every_saved_state(tmp_path):
    seen = []
    result = search.run_search(_config(max_rounds=2), tmp_path, train_fn=ScriptedTrainer(),
                               on_update=[lambda state, round_ended: seen.append(
                                   (len(state.trained_entries()), round_ended))])
    assert seen[-1] == (result.num_trained, True)  # the last save ends the search
    trained = [n for n, _ in seen]
    assert trained == sorted(trained) and set(range(result.num_trained + 1)) <= set(trained)
    assert sum(ended for _, ended in seen) >= result.num_rounds  # each round's end, at least
    assert search.load_state(tmp_path) == _state(tmp_path)


def test_round0_median_reward_selection_and_memory_of_entries(tmp_path):
    config = _config(max_rounds=1, round0_selection="median_reward", full_train_cap=6)
    search.run_search(config, tmp_path, train_fn=ScriptedTrainer())
    rnd = _state(tmp_path).rounds[0]
    assert rnd.winner == max(rnd.entries, key=lambda e: e.reward).hash
    # Memory figures are memory_report's, on the skeleton sized to the data (16 px, 4 classes).
    from memnas_jax.space import cifar_skeleton
    skeleton = cifar_skeleton(4, num_classes=4).replace(image_size=16)
    for e in rnd.entries:
        report = memory_report(e.architecture, skeleton)
        assert (e.param_bytes, e.working_bytes, e.total_bytes) == (
            report.param_bytes, report.working_bytes, report.total_bytes)
    assert rnd.reference.kind == "median of round 0"


def test_cell_cap_stops_the_search(tmp_path):
    config = _config(max_rounds=10, max_cells=2, stop_when_no_improvement=False)
    result = search.run_search(config, tmp_path, train_fn=ScriptedTrainer())
    state = _state(tmp_path)
    assert state.stop_reason == "cell cap reached (2 cells per block)"
    assert min(state.rounds[-1].entries[0].cells_per_block) <= 2
    assert result.architecture.cells_per_block == (2,) * 5


def test_memory_budget_drops_candidates_before_training(tmp_path):
    config = _config(max_rounds=2, full_train_cap=0)
    from memnas_jax.space import cifar_skeleton
    skeleton = cifar_skeleton(4, num_classes=4).replace(image_size=16)
    totals = sorted(memory_report(c.architecture, skeleton).total_bytes
                    for c in initial_candidates(5, _round0_options(config)))
    config.memory.budget_mb = totals[4] / 1e6  # the 5 smallest of 9 fit (ties excluded)
    trainer = ScriptedTrainer()
    search.run_search(config, tmp_path, train_fn=trainer)
    state = _state(tmp_path)
    r0 = state.rounds[0]
    within = sum(t <= totals[4] for t in totals)
    assert r0.num_generated == 9 and len(r0.entries) == within
    assert r0.num_over_budget == 9 - within
    trained = {e.hash: e for r in state.rounds for e in r.entries}
    assert set(trainer.calls) <= set(trained)
    assert all(e.total_bytes <= totals[4] for e in trained.values())

    config.memory.budget_mb = totals[0] / 2e6  # nothing fits
    search.run_search(config, tmp_path / "none", train_fn=trainer)
    state = _state(tmp_path / "none")
    assert state.stop_reason == "no candidate of round 0 is within the memory budget"
    assert state.rounds[0].num_over_budget == 9


def test_failed_and_diverged_candidates_are_recorded_and_the_search_goes_on(tmp_path):
    config = _config()
    hashes = [c.arch_hash for c in initial_candidates(5, _round0_options(config))]
    planned = [hashes[i] for i in search.seeded_sample(hashes, 4, config.seed, 0)]
    outcomes = {planned[0]: "failed", planned[2]: "diverged"}
    result = search.run_search(config, tmp_path, train_fn=ScriptedTrainer(outcomes))
    state = _state(tmp_path)
    r0 = state.rounds[0]
    assert [e.status for e in r0.entries] == ["failed", "ok", "diverged", "ok"]
    for e in r0.entries[::2]:
        assert e.accuracy is None and e.reward is None
        assert e.message == f"scripted {e.status}"
    assert r0.winner in planned[1::2]
    assert len(state.rounds) >= 2 and result.finished
    records = reports.read_candidates(tmp_path)
    assert [r["status"] for r in records[:4]] == ["failed", "ok", "diverged", "ok"]
    rows = [line for line in (tmp_path / reports.LEADERBOARD_FILE).read_text().splitlines()
            if line.startswith("| 0 |")]
    assert "| 4/4 | 2 |" in rows[0]  # trained 4 of 4, 2 failed or diverged


def test_all_candidates_failing_stops_with_a_reason(tmp_path):
    config = _config()
    everything = {c.arch_hash: "failed"
                  for c in initial_candidates(5, _round0_options(config))}
    result = search.run_search(config, tmp_path, train_fn=ScriptedTrainer(everything))
    assert result.architecture is None
    assert result.stop_reason == "no candidate of round 0 trained successfully"
    assert json.loads((tmp_path / reports.BEST_FILE).read_text())["best"] is None


# ---------------------------------------------------------------------------------------------
# Resume


def test_interrupted_search_resumes_to_the_same_result(tmp_path):
    config = _config(max_rounds=4, stop_when_no_improvement=False)
    reference = search.run_search(config, tmp_path / "whole", train_fn=ScriptedTrainer())
    total = reference.num_trained
    workdir = tmp_path / "interrupted"
    calls = []
    for stop_at in (1, 4, 9):  # inside round 0, at the end of round 0, inside round 2
        trainer = ScriptedTrainer(interrupt_after=stop_at - len(calls))
        with pytest.raises(Interrupted):
            search.run_search(config, workdir, train_fn=trainer)
        calls += trainer.calls
        state = _state(workdir)
        assert sum(e.status != "pending" for r in state.rounds
                   for e in r.entries) == stop_at
        assert len(reports.read_candidates(workdir)) == stop_at
    trainer = ScriptedTrainer()
    resumed = search.run_search(config, workdir, train_fn=trainer)
    calls += trainer.calls
    assert len(calls) == total  # no candidate trained twice
    assert resumed.arch_hash == reference.arch_hash and resumed.winners == reference.winners
    assert (_without_timing(reports.read_candidates(workdir))
            == _without_timing(reports.read_candidates(tmp_path / "whole")))
    assert json.loads((workdir / reports.BEST_FILE).read_text()) == json.loads(
        (tmp_path / "whole" / reports.BEST_FILE).read_text())
    # A finished workdir only regenerates the outputs.
    trainer = ScriptedTrainer()
    again = search.run_search(config, workdir, train_fn=trainer)
    assert trainer.calls == [] and again == resumed


def test_time_budget_stops_between_rounds_and_a_larger_one_continues_exactly(tmp_path):
    config = _config(max_rounds=3, stop_when_no_improvement=False)
    reference = search.run_search(config, tmp_path / "whole", train_fn=ScriptedTrainer())
    config.search.time_budget_minutes = 1e-9  # spent by the end of round 0
    stopped = search.run_search(config, tmp_path / "budget", train_fn=ScriptedTrainer())
    assert stopped.finished and stopped.stop_reason.startswith("time budget reached")
    assert "after round 0" in stopped.stop_reason and stopped.num_rounds == 1
    assert search.load_state(tmp_path / "budget").elapsed_seconds > 0
    config.search.time_budget_minutes = 0.0  # a run-only field: no --allow_config_change
    trainer = ScriptedTrainer()
    resumed = search.run_search(config, tmp_path / "budget", train_fn=trainer)
    assert resumed.winners == reference.winners and resumed.stop_reason == reference.stop_reason
    assert (_without_timing(reports.read_candidates(tmp_path / "budget"))
            == _without_timing(reports.read_candidates(tmp_path / "whole")))
    with pytest.raises(ValueError, match="time_budget_minutes must be >= 0"):
        config.search.time_budget_minutes = -1.0
        search.check_config(config)


def test_out_of_memory_streak_stops_with_advice_and_a_rerun_retrains_those(tmp_path):
    config = _config(max_rounds=2, full_train_cap=6, max_consecutive_oom=2)
    reference = search.run_search(config, tmp_path / "whole", train_fn=ScriptedTrainer())
    hashes = [e.hash for e in _state(tmp_path / "whole").rounds[0].entries]
    oom = ScriptedTrainer(outcomes={h: "out_of_memory" for h in hashes})
    stopped = search.run_search(config, tmp_path / "oom", train_fn=oom)
    assert len(oom.calls) == 2 and stopped.finished and stopped.architecture is None
    assert "2 candidates in a row ran out of accelerator memory" in stopped.stop_reason
    assert "train.batch_size" in stopped.stop_reason and "memory.budget_mb" in stopped.stop_reason
    records = reports.read_candidates(tmp_path / "oom")
    assert [(r["status"], r["failure"]) for r in records] == [("failed", "out_of_memory")] * 2
    assert records[0]["total_bytes"] > 0  # the candidate's memory report is in its record
    # The rerun (a smaller batch, here a trainer that fits) trains those two again and goes on.
    resumed = search.run_search(config, tmp_path / "oom", train_fn=ScriptedTrainer())
    assert resumed.winners == reference.winners
    assert (_without_timing(reports.read_candidates(tmp_path / "oom"))
            == _without_timing(reports.read_candidates(tmp_path / "whole")))


def test_out_of_memory_errors_are_classified(monkeypatch):
    from memnas_jax import data as data_lib
    from memnas_jax import train
    from memnas_jax.train import loop

    def exhausted(*args):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9.1GiB")
    monkeypatch.setattr(loop, "_train", exhausted)
    data = data_lib.synthetic_dataset(num_train=64, num_validation=32, num_test=0)
    result = train.train_candidate(initial_candidates()[0].architecture, train.default_config(),
                                   data, jax.random.key(0))
    assert result.status == "failed" and result.failure == "out_of_memory"
    assert train.is_out_of_memory(MemoryError("CUDA out of memory"))
    assert not train.is_out_of_memory(ValueError("shapes do not match"))


def test_corrupt_state_falls_back_to_the_previous_copy(tmp_path):
    config = _config(max_rounds=2)
    reference = search.run_search(config, tmp_path / "whole", train_fn=ScriptedTrainer())
    workdir = tmp_path / "corrupt"
    with pytest.raises(Interrupted):
        search.run_search(config, workdir, train_fn=ScriptedTrainer(interrupt_after=3))
    state_file = workdir / search.STATE_FILE
    state_file.write_text(state_file.read_text()[:-100])  # a torn write
    trainer = ScriptedTrainer()
    resumed = search.run_search(config, workdir, train_fn=trainer)
    assert len(trainer.calls) == reference.num_trained - 2  # state.prev.json had 2 trained
    assert resumed.arch_hash == reference.arch_hash
    assert (_without_timing(reports.read_candidates(workdir))
            == _without_timing(reports.read_candidates(tmp_path / "whole")))

    for name in (search.STATE_FILE, search.PREV_STATE_FILE):
        (workdir / name).write_text("{not json")
    with pytest.raises(search.StateError, match="cannot resume.*state.json is unreadable"):
        search.run_search(config, workdir, train_fn=ScriptedTrainer())


def test_corrupt_controller_is_refitted_on_resume(tmp_path, caplog):
    """Killed in round 1 (ranked by the controller fitted after round 0), its controller file
    then torn: the resumed search refits that controller (its fit had no warm start, so the
    refit is the same) and ends exactly like the uninterrupted search."""
    config = _config(max_rounds=3, full_train_rounds=1, full_train_cap=4, top_k=2,
                     stop_when_no_improvement=False)
    reference = search.run_search(config, tmp_path / "whole", train_fn=ScriptedTrainer())
    workdir = tmp_path / "torn"
    with pytest.raises(Interrupted):
        search.run_search(config, workdir, train_fn=ScriptedTrainer(interrupt_after=5))
    state = _state(workdir)
    assert [r.mode for r in state.rounds][1] == "controller"
    params = workdir / state.controller.path / controller_lib.PARAMS_FILE
    params.write_bytes(params.read_bytes()[: len(params.read_bytes()) // 2])
    with caplog.at_level(logging.WARNING):
        resumed = search.run_search(config, workdir, train_fn=ScriptedTrainer())
    assert "controller of round 0 unreadable" in caplog.text
    assert resumed.arch_hash == reference.arch_hash and resumed.winners == reference.winners
    assert (_without_timing(reports.read_candidates(workdir))
            == _without_timing(reports.read_candidates(tmp_path / "whole")))


def test_a_workdir_refuses_another_config_unless_allowed(tmp_path):
    config = _config(max_rounds=1)
    search.run_search(config, tmp_path, train_fn=ScriptedTrainer())
    changed = _config(max_rounds=1)
    changed.reward.lam = 0.8
    with pytest.raises(search.ConfigMismatchError,
                       match=r"different config \(reward.lam: 0.5 -> 0.8\).*allow_config_change"):
        search.run_search(changed, tmp_path, train_fn=ScriptedTrainer())
    # Output options do not bind the workdir.
    quiet = _config(max_rounds=1)
    quiet.output.leaderboard_rows = 3
    search.run_search(quiet, tmp_path, train_fn=ScriptedTrainer())
    # Allowed: the workdir is rebound to the new config (a finished search stays finished).
    changed.resume_with_changed_config = True
    result = search.run_search(changed, tmp_path, train_fn=ScriptedTrainer())
    state = _state(tmp_path)
    assert state.config_changes == ("reward.lam: 0.5 -> 0.8",)
    assert state.config["reward.lam"] == 0.8 and result.finished


def test_bad_config_values_raise_clear_errors(tmp_path):
    for field, value, message in (
            ("search.round0_selection", "best", "search.round0_selection = 'best' is not one of"),
            ("search.top_k", 0, "search.top_k must be an integer >= 1"),
            ("memory.budget_mb", -1.0, "memory.budget_mb must be >= 0"),
            ("reward.lam", 2.0, "lam must be in"),
            ("grow_trim.growth", "sideways", "config.grow_trim: .*growth"),
            ("search.accuracy_metric", "test_accuracy", "needs config.search.evaluate_test")):
        config = _config()
        group, name = field.split(".")
        config[group][name] = value
        with pytest.raises(ValueError, match=message):
            search.run_search(config, tmp_path, train_fn=ScriptedTrainer())
    assert not (tmp_path / search.STATE_FILE).exists()


def test_settings_are_the_config_checked_once():
    config = _config()
    settings = search.SearchSettings.from_config(config)
    assert settings.search.top_k == config.search.top_k and settings.seed == config.seed
    assert settings.train.epochs == config.train.epochs == 2
    assert settings.controller_config(3).seed == search.derive_seed(config.seed, "controller", 3)
    for field, value, message in (
            ("search.top_k", "3", r"config.search.top_k must be int, got '3'"),
            ("search.topk", 3, r"config.search.topk is not a setting; the settings are \["),
            ("parallel.packing", 1, r"config.parallel.packing must be str"),
            ("grow_trim.combine_modes", ("add", 2), r"combine_modes must be a sequence of strs"),
            ("train.batch_size", 0, r"config.train.batch_size must be >= 1")):
        values = _config().to_dict()  # a plain mapping: a ConfigDict refuses other types
        group, name = field.split(".")
        values[group][name] = value
        with pytest.raises(ConfigError, match=message):
            search.SearchSettings.from_config(values)


# The fingerprints of the previous main (b874009) for these configs: a work directory it made
# resumes without --allow_config_change while they hold.
PREVIOUS_FINGERPRINTS = {
    "default": "7378beb9eee4b5925f2c43ca9cb12f2a62c4a82ae176cc5a6a40cf6058fabe9e",
    "cifar10.py:paper": "a7e952edaba0d3cf0bbbebd83d177ed8e15e2d4f5402cb9aa4836a7817a352e9",
    "cifar10.py:smoke": "8bf4d114d27729bdc248f804f857885d9e48ad9334787b441104d3ec06e4220d",
}


def test_config_fingerprints_are_those_of_the_previous_main():
    configs = {"default": search.default_config(),
               "cifar10.py:paper": _preset("experiments/configs/cifar10.py", "paper"),
               "cifar10.py:smoke": _preset("experiments/configs/cifar10.py", "smoke")}
    assert {k: search.config_fingerprint(c)[1] for k, c in configs.items()} == (
        PREVIOUS_FINGERPRINTS)


def test_records_keep_both_memory_figures_and_deployed_scores(tmp_path):
    """Whatever the convention, every entry records the paper and the deployed working memory;
    with memory.convention = "deployed" the reward and the budget use TFLite Micro's arena."""
    paper = search.run_search(_config(max_rounds=1), tmp_path / "paper",
                              train_fn=ScriptedTrainer())
    config = _config(max_rounds=1)
    config.memory.convention = "deployed"
    deployed = search.run_search(config, tmp_path / "deployed", train_fn=ScriptedTrainer())
    from memnas_jax.space import cifar_skeleton
    skeleton = cifar_skeleton(4, num_classes=4).replace(image_size=16)  # the test preset's
    for workdir in (tmp_path / "paper", tmp_path / "deployed"):
        for e in _state(workdir).rounds[0].entries:
            report = memory_report(e.architecture, skeleton)
            assert (e.working_bytes_paper, e.working_bytes_deployed) == (
                report.working_bytes_paper, report.working_bytes_deployed)
    for e in _state(tmp_path / "deployed").rounds[0].entries:
        assert e.working_bytes == e.working_bytes_deployed > e.working_bytes_paper
    for e in _state(tmp_path / "paper").rounds[0].entries:
        assert e.working_bytes == e.working_bytes_paper
    records = reports.read_candidates(tmp_path / "paper")
    assert all(r["working_bytes_deployed"] for r in records)
    assert paper.num_trained == deployed.num_trained


def test_random_ranking_is_the_random_search_control(tmp_path):
    """search.ranking = "random": after the fully trained rounds, a seeded sample of top_k of
    the same grow-trim candidates trains, and no controller is fitted; the default is left out
    of the fingerprint, so work directories made before the field existed still resume."""
    config = _config(max_rounds=3, full_train_rounds=1, full_train_cap=3, top_k=2,
                     stop_when_no_improvement=False, ranking="random")
    result = search.run_search(config, tmp_path / "random", train_fn=ScriptedTrainer())
    state = _state(tmp_path / "random")
    assert [r.mode for r in state.rounds] == ["sampled"] * 3
    assert [len(r.entries) for r in state.rounds] == [3, 2, 2] and result.num_trained == 7
    assert state.controller is None
    again = search.run_search(config, tmp_path / "again", train_fn=ScriptedTrainer())
    assert again.winners == result.winners  # seeded: the same sample
    default = _config()
    assert default.search.ranking == "controller"
    relevant, digest = search.config_fingerprint(default)
    assert "search.ranking" not in relevant
    with default.unlocked():
        default.search.ranking = "random"
    assert search.config_fingerprint(default)[1] != digest
    with pytest.raises(ConfigError, match="config.search.ranking"):
        search.run_search(_config(ranking="best"), tmp_path / "bad", train_fn=ScriptedTrainer())


def test_state_file_round_trip_and_checksum(tmp_path):
    state = search.SearchState(config={"x": [1, 2.5, None, "é"]}, config_hash="h")
    search.save_state(state, tmp_path)
    search.save_state(dataclasses.replace(state, config={"x": [3]}), tmp_path)
    assert search.load_state(tmp_path).config["x"] == [3]
    text = (tmp_path / search.STATE_FILE).read_text().replace("[3]", "[4]")
    (tmp_path / search.STATE_FILE).write_text(text)  # valid JSON, wrong checksum
    assert search.load_state(tmp_path) == state
    with pytest.raises(ValueError):  # NaN never reaches a state file
        search.save_state(dataclasses.replace(state, config={"bad": float("nan")}), tmp_path)


# A state.json written by main before the state was typed (commit b874009): the scripted search of
# test_a_state_of_the_previous_main_resumes, killed after 6 candidates (inside round 1).
V1_STATE = REPO_ROOT / "tests" / "data" / "state_v1_interrupted.json"


def test_a_state_of_the_previous_main_resumes(tmp_path):
    config = _config(max_rounds=4, stop_when_no_improvement=False)
    reference = search.run_search(config, tmp_path / "whole", train_fn=ScriptedTrainer())
    # Its JSON form is read back unchanged, field for field.
    raw = json.loads(V1_STATE.read_text())
    assert raw["format"] == search.STATE_FORMAT
    assert search.SearchState.from_json(raw["state"]).to_json() == raw["state"]
    workdir = tmp_path / "v1"
    workdir.mkdir()
    (workdir / search.STATE_FILE).write_text(V1_STATE.read_text())
    config.resume_with_changed_config = True  # config fields added since only change its hash
    trainer = ScriptedTrainer()
    resumed = search.run_search(config, workdir, train_fn=trainer)
    assert len(trainer.calls) == reference.num_trained - 6
    assert resumed.winners == reference.winners and resumed.arch_hash == reference.arch_hash
    assert (_without_timing(reports.read_candidates(workdir))
            == _without_timing(reports.read_candidates(tmp_path / "whole")))


def test_a_state_of_another_format_is_refused_by_name(tmp_path):
    raw = json.loads(V1_STATE.read_text())
    raw["format"] = "memnas_jax.search_state/v9"
    (tmp_path / search.STATE_FILE).write_text(json.dumps(raw))
    with pytest.raises(search.StateError, match="format is 'memnas_jax.search_state/v9'; this "
                       "memnas_jax reads 'memnas_jax.search_state/v1'"):
        search.run_search(_config(), tmp_path, train_fn=ScriptedTrainer())
    raw["format"] = search.STATE_FORMAT
    raw["state"]["rounds"][0]["entries"][0]["colour"] = "red"  # checksum fixed below
    body = json.dumps(raw["state"], sort_keys=True)
    raw["sha256"] = hashlib.sha256(body.encode()).hexdigest()
    (tmp_path / search.STATE_FILE).write_text(json.dumps(raw))
    with pytest.raises(search.StateError, match=r"round 0 entry 0 has unknown fields \['colour'\]"):
        search.load_state(tmp_path)


# ---------------------------------------------------------------------------------------------
# Packed training in the search loop (the trainer scripted; tests/test_packed.py trains packs)


@dataclasses.dataclass
class ScriptedPackTrainer(ScriptedTrainer):
    """Trains packs as ScriptedTrainer would train their candidates one by one; a pack of
    more than `fits` candidates runs out of memory."""

    fits: int = 100
    packs: list = dataclasses.field(default_factory=list)
    compiles_ahead = False  # a full search.Trainer: packs, no compiling ahead

    def __call__(self, arch, skeleton, key, *, programs=None, mesh=None):
        return super().__call__(arch, skeleton, key)

    def compile(self, arch, skeleton):
        raise AssertionError("not compiled ahead")

    def why_not_packed(self):
        return None

    def compile_pack(self, template, pack_size, selection):
        assert template.skeleton is not None and selection in ("select", "switch")
        return types.SimpleNamespace(pack_size=pack_size, compile_seconds=0.5)

    def train_pack(self, archs, skeleton, keys, programs):
        self.packs.append(len(archs))
        if len(archs) > self.fits:
            return [dataclasses.replace(self(a, skeleton, k), status="failed", failure=(
                "out_of_memory"), best_val_accuracy=None) for a, k in zip(archs, keys)]
        return [self(a, skeleton, k) for a, k in zip(archs, keys)]


def test_packed_rounds_record_what_one_by_one_training_gives(tmp_path):
    alone = search.run_search(_config(), tmp_path / "alone", train_fn=ScriptedTrainer())
    config = _config()
    config.parallel.update(dict(packing="packed", pack_size=4))
    trainer = ScriptedPackTrainer(fits=2)
    packed = search.run_search(config, tmp_path / "packed", train_fn=trainer)
    assert packed.architecture == alone.architecture
    assert (_without_timing(reports.read_candidates(tmp_path / "packed"))
            == _without_timing(reports.read_candidates(tmp_path / "alone")))
    # Packs of 4 ran out of memory once; the round backed off to 2 and kept that.
    assert trainer.packs[:3] == [4, 2, 2]
    state = _state(tmp_path / "packed")
    assert state.rounds[0].packing == search.Packing(pack_size=2, selection="select")
    assert all(e.compile_seconds > 0 for e in state.rounds[0].entries[:2])


def test_packing_choices_and_their_errors(tmp_path):
    config = _config(max_rounds=1)
    search.run_search(config, tmp_path / "auto", train_fn=ScriptedPackTrainer())
    # "auto" on a CPU trains standalone (README, "Packed training"); recorded in the round.
    assert _state(tmp_path / "auto").rounds[0].packing is None
    # A round trained before packing existed (no record) goes on standalone when resumed.
    state = _state(tmp_path / "auto")
    rnd = state.rounds[0]
    rnd = dataclasses.replace(rnd.with_entry(1, rnd.entries[1].untrained()), phase="training",
                              packing=None, packing_decided=False)
    state = dataclasses.replace(state.with_round(rnd), status="running", stop_reason=None)
    search.save_state(state, tmp_path / "auto")
    packed_config = _config(max_rounds=1)
    packed_config.parallel.update(dict(packing="packed", pack_size=2))
    trainer = ScriptedPackTrainer()
    search.run_search(packed_config, tmp_path / "auto", train_fn=trainer)
    assert trainer.packs == [] and len(trainer.calls) == 1
    assert _state(tmp_path / "auto").rounds[0].packing is None
    config.parallel.packing = "packed"
    with pytest.raises(ConfigError, match="trains one candidate at a time"):
        search.run_search(config, tmp_path / "plain", train_fn=ScriptedTrainer())
    for field, value, message in (
            ("packing", "sometimes", "parallel.packing = 'sometimes' is not one of"),
            ("candidate_groups", 2, "set parallel.candidate_groups = 1"),
            ("pack_size", -1, "parallel.pack_size must be an integer >= 0")):
        config = _config(max_rounds=1)
        config.parallel.update({"packing": "packed", field: value})
        with pytest.raises(ValueError, match=message):
            search.run_search(config, tmp_path / "bad", train_fn=ScriptedPackTrainer())


def test_training_order_covers_every_op_first():
    from memnas_jax.encoding import Cell, uniform_architecture
    archs = [uniform_architecture([Cell(0, 0, a, b)]) for a, b in
             [(0, 0), (0, 1), (2, 3), (1, 2)]]
    # (0, 1) adds two ops, then (2, 3) two more; the rest add none and keep their order
    assert search.training_order(archs) == [1, 2, 0, 3]
    assert search.training_order([]) == []


def test_training_order_of_a_real_round_is_a_permutation_covering_its_ops_early():
    config = _config()
    options = search.SearchSettings.from_config(config).grow_trim_options(0)
    archs = [c.architecture for c in initial_candidates(5, options)]
    order = search.training_order(archs)
    assert sorted(order) == list(range(len(archs)))
    def ops(arch):
        return {op for block in arch for c in block for op in (c.op1, c.op2) if op is not None}
    every = set().union(*(ops(a) for a in archs))
    first = set()
    for k, i in enumerate(order):
        first |= ops(archs[i])
        if first == every:
            break
    assert k + 1 <= (len(every) + 1) // 2  # two ops a cell: about half as many candidates as ops


@pytest.mark.parametrize("field, value, message", [
    ("data.name", "cifar11", "config.data.name = 'cifar11' is not one of"),
    ("data.train_subset", -1, "config.data.train_subset must be an integer >= 0"),
    ("data.synthetic.image_size", 2, "config.data.synthetic.image_size must be an integer >= 4"),
    ("skeleton.kind", "foo", "config.skeleton.kind = 'foo' is not one of ('cifar', 'imagenet')"),
    ("skeleton.width", -3, "config.skeleton.width must be an integer >= 1, got -3"),
    ("skeleton.width_schedule", "1,2", "config.skeleton.width_schedule must be 'uniform'"),
    ("skeleton.bn_momentum", 1.5, "config.skeleton.bn_momentum must be in [0, 1)"),
    ("distributed.num_processes", -2, "config.distributed.num_processes must be an integer"),
    ("host_device_count", -1, "config.host_device_count must be an integer >= 0"),
    ("gpu_deterministic", "yes", "config.gpu_deterministic must be bool"),
    ("preemption_grace_seconds", 0, "config.preemption_grace_seconds must be > 0"),
    ("seed", -1, "config.seed must be an integer >= 0"),
])
def test_every_config_section_passes_the_boundary(field, value, message):
    config = search.default_config()
    *path, name = field.split(".")
    section = config
    for part in path:
        section = section[part]
    with section.ignore_type():
        section[name] = value
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[")):
        search.check_config(config)


def test_an_unknown_top_level_field_or_section_is_named():
    config = search.default_config()
    config.colour = "blue"
    with pytest.raises(ConfigError, match="config.colour is not a setting"):
        search.check_config(config)


def test_the_trainer_contract_is_declared_not_probed():
    assert isinstance(ScriptedPackTrainer(), search.Trainer)
    plain = ScriptedTrainer()  # a plain function: wrapped, no compile ahead, no packs
    assert not isinstance(plain, search.Trainer)
    wrapped = search.FunctionTrainer(plain)
    assert isinstance(wrapped, search.Trainer) and not wrapped.compiles_ahead
    assert "one candidate at a time" in wrapped.why_not_packed()
    arch = initial_candidates(5, _round0_options(_config()))[0].architecture
    key = jax.random.key(0)
    assert wrapped(arch, None, key) == plain(arch, None, key)
