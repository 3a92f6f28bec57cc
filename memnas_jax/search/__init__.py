"""The MemNAS search loop with exact resume: `run_search(config, workdir) -> SearchResult`.

One round (docs/method.md §1, §6, §7):

1. generate: round 0 the single-cell networks (`grow_trim.initial_candidates`), later rounds every
   grow / trim of the base (`grow_trim.generate_candidates`);
2. drop the candidates over the memory budget (`config.memory.budget_mb`, total = parameter +
   working memory from `memory.memory_report`) before anything is compiled;
3. choose what to train: in the first `search.full_train_rounds` rounds every candidate (or, past
   `search.full_train_cap`, a seeded sample of that many); later the controller's top
   `search.top_k` of all remaining candidates (a seeded sample of that many while no controller
   could be fitted yet);
4. train them one by one (`train.train_candidate`), the next candidates' programs compiling in
   background threads meanwhile (`memnas_jax.compile_ahead`, `parallel.compile_ahead`) and every
   compiled program kept in the persistent compilation cache (`train.compilation_cache_dir`,
   default <workdir>/xla_cache); a failed or diverged candidate is recorded and the search goes
   on;
5. select: the reward (`reward.memory_efficient_reward`) of each candidate relative to the round's
   reference, the base network for rounds >= 1. Round 0 has no base: its reference is the median
   accuracy / parameter memory / working memory of the round's trained candidates, and its winner
   is the most accurate candidate (`search.round0_selection = "accuracy"`, as the authors, whose
   round-0 winner net53 was their most accurate) or the best reward against that median
   reference ("median_reward");
6. refit the controller on every trained candidate so far (targets: each candidate's reward
   relative to its own round's reference, or its accuracy; groups = rounds), warm-started from the
   previous round's controller; the winner is the next base. The first fit follows the last
   fully trained round: no round uses a controller before, and that fit sees all their data.

It stops at the round cap (`search.max_rounds` rounds, round 0 included), at the cell cap (the
base has `search.max_cells` cells in every block), when no candidate is within the budget, or when
no candidate of a round has a reward > 0 against its base (`search.stop_when_no_improvement`).
The answer is the last round winner.

Exact resume. Every random choice is a pure function of the config seed, the round and the
candidate hash (`derive_seed`): a candidate trains with the key of (seed, its hash), wherever and
whenever it is trained; capped rounds sample by the hashes; the controller of round r is seeded by
(seed, r). The state (each round's base, its training plan with every candidate's status and
results, the controller's location, the config and its hash) is rewritten atomically after every
trained candidate (`state.json`, the previous copy kept as `state.prev.json`); the controller
parameters are saved per round with `controller.save`. Rerunning the same command resumes; a run
killed at any moment and resumed trains the same candidates with the same results and ends on the
same architecture as an uninterrupted one, losing at most the candidate in flight.

The package, one job per module:

* `config`: `default_config` and the fingerprint that tells whether a work directory may be
  resumed with a config;
* `settings`: `SearchSettings`, the config checked and frozen once at the entry (`from_config`):
  what every other module reads;
* `seeds`: every random choice as a pure function of the seed and names;
* `policy`: the pure rules of a round (what to train, the reference, rewards, the winner, stopping);
* `state`: the typed, frozen search state (`Entry` in a `Round` in a `SearchState`), its JSON form
  and file (atomic, checksummed, previous copy kept, format-versioned), and the `SearchResult`;
* `trainer`: the `Trainer` contract and `CandidateTrainer`, what trains a candidate or a pack;
* `training`: `RoundTrainer`, a round's candidates trained with it (standalone, groups or
  packs), each step yielded to the loop;
* `fitting`: `ControllerFitter`, the controller refitted after each round, saved, restored
  after a resume;
* `progress`: the progress bar and the log lines;
* `reports`: what the search leaves in its work directory, a view of the state (candidates.jsonl,
  best.json, the leaderboard, plots, TensorBoard);
* `loop`: `run_search`, the round state machine over the above and the one owner of the
  state (the collaborators return what they produce); after each save it calls the
  update hooks (the reports of the work directory, and the caller's `on_update`);
* `experiment`: `run_experiment`, what the experiment mains run.
"""

from memnas_jax.search.config import (
    RUN_ONLY_FIELDS,
    ConfigMismatchError,
    check_config,
    config_fingerprint,
    default_config,
)
from memnas_jax.search.experiment import run_experiment
from memnas_jax.search.fitting import CONTROLLER_DIR
from memnas_jax.search.loop import OOM_STOP, TIME_BUDGET_STOP, UpdateHook, run_search
from memnas_jax.search.policy import (
    plan_round,
    planned_candidates,
    select_winner,
    stop_reason,
    training_order,
)
from memnas_jax.search.seeds import candidate_key, derive_seed, seeded_sample
from memnas_jax.search.settings import (
    ACCURACY_METRICS,
    CONTROLLER_TARGETS,
    PACKING_MODES,
    ROUND0_SELECTIONS,
    GrowTrimSettings,
    MemorySettings,
    OutputSettings,
    ParallelSettings,
    RunSettings,
    SearchRules,
    SearchSettings,
    controller_vocab_sizes,
)
from memnas_jax.search.state import (
    CONFIG_FILE,
    PREV_STATE_FILE,
    STATE_FILE,
    STATE_FORMAT,
    Base,
    ControllerFit,
    ControllerRef,
    Entry,
    Packing,
    Reference,
    Round,
    SearchResult,
    SearchState,
    StateError,
    Winner,
    load_state,
    save_state,
)
from memnas_jax.search.trainer import (
    AUTO_MAX_PACK,
    CANDIDATE_CHECKPOINT_DIR,
    CandidateTrainer,
    FunctionTrainer,
    Trainer,
    TrainFn,
)

__all__ = [
    "ACCURACY_METRICS", "AUTO_MAX_PACK", "CANDIDATE_CHECKPOINT_DIR", "CONFIG_FILE",
    "CONTROLLER_DIR", "CONTROLLER_TARGETS", "OOM_STOP", "PACKING_MODES", "PREV_STATE_FILE",
    "ROUND0_SELECTIONS", "RUN_ONLY_FIELDS", "STATE_FILE", "STATE_FORMAT", "TIME_BUDGET_STOP",
    "Base", "CandidateTrainer", "ConfigMismatchError", "ControllerFit", "ControllerRef", "Entry",
    "GrowTrimSettings", "MemorySettings", "OutputSettings", "Packing", "ParallelSettings",
    "Reference", "Round", "RunSettings", "SearchResult", "SearchRules", "SearchSettings",
    "SearchState",
    "StateError", "TrainFn", "Trainer", "FunctionTrainer", "UpdateHook", "Winner",
    "candidate_key", "check_config",
    "config_fingerprint",
    "controller_vocab_sizes", "default_config", "derive_seed", "load_state", "plan_round",
    "planned_candidates", "run_experiment", "run_search", "save_state", "seeded_sample",
    "training_order",
    "select_winner", "stop_reason",
]
