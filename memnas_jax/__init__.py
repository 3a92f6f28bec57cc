"""memnas_jax: MemNAS (memory-efficient NAS with grow-trim learning) in JAX/Flax.

`memnas_jax.encoding`, `memnas_jax.space`, `memnas_jax.plan`, `memnas_jax.template` and
`memnas_jax.paper_proxy` import with numpy alone; the modules that build or train networks import
jax and flax. docs/method.md describes the method; the README maps the modules.
"""

from memnas_jax.encoding import Architecture, Cell, EncodingError  # noqa: F401

__version__ = "0.1.0"
