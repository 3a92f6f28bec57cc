"""memnas_jax: MemNAS (memory-efficient NAS with grow-trim learning) in JAX/Flax.

`memnas_jax.encoding` and `memnas_jax.space` import with numpy alone; the modules that build or
train networks import jax and flax.
"""

from memnas_jax.encoding import Architecture, Cell, EncodingError  # noqa: F401

__version__ = "0.1.0"
