r"""A searched network against the baselines: results.md and results.png.

    python experiments/compare.py --search=runs/quick \
        --final=runs/quick_final,runs/quick_resnet20 --out=runs/quick

--search is a search's work directory (its answer and Pareto front, proxy-trained); --control its
random-search control's (`--config.search.ranking=random`: answers and fronts compared); --final
lists train_final.py work directories (the answer's final training, `--baseline` runs). Every
final row is measured the same way (float32 parameters + peak live activations at batch 1,
`memory.analyze`); the paper's CIFAR-10 rows are added as published, drawn hollow.
"""

from __future__ import annotations

import pathlib

from absl import app, flags

from memnas_jax import comparison, errors

_SEARCH = flags.DEFINE_string("search", None, "A search's work directory (optional).")
_FINAL = flags.DEFINE_list("final", [], "train_final.py work directories.")
_CONTROL = flags.DEFINE_string("control", None, "The work directory of the search's "
                               "random-search control (search.ranking=random; optional).")
_OUT = flags.DEFINE_string("out", None, "Where results.md and results.png go.", required=True)
_TITLE = flags.DEFINE_string("title", "MemNAS search against hand-designed baselines",
                             "Title of the table and the plot.")


def _gather():
    searches = [d for d in (_SEARCH.value, _CONTROL.value) if d]
    missing = [d for d in searches + _FINAL.value if not pathlib.Path(d).is_dir()]
    if missing:
        raise errors.UserError(f"not a directory: {', '.join(missing)}")
    if _CONTROL.value and not _SEARCH.value:
        raise errors.UserError("--control compares a search with its random-search control: "
                               "give --search too")
    try:
        rows = comparison.gather(_SEARCH.value, _FINAL.value, _CONTROL.value)
        extra = (comparison.search_against_control(_SEARCH.value, _CONTROL.value)
                 if _CONTROL.value else "")
        return rows, extra
    except (OSError, KeyError, ValueError) as e:
        raise errors.UserError(f"cannot read the runs ({type(e).__name__}: {e}); --search takes "
                               "a search's work directory, --final train_final.py ones") from None


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    rows, extra = errors.exit_on_user_error(_gather)
    comparison.write(rows, _OUT.value, _TITLE.value, extra)
    print(comparison.markdown(rows, _TITLE.value) + (f"\n{extra}" if extra else ""))


if __name__ == "__main__":
    app.run(main)
