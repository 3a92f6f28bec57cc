"""Figures as files: matplotlib with the Agg backend (no display), written atomically."""

from __future__ import annotations

import io
import os

from memnas_jax.io import atomic_write


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: str | os.PathLike) -> None:
    """Renders `fig` as a PNG and writes it with `io.atomic_write`, then closes it."""
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, dpi=120, format="png")
    finally:
        pyplot().close(fig)
    atomic_write(path, buffer.getvalue())
