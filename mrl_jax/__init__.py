"""mrl_jax: Matryoshka Representation Learning (Kusupati et al., NeurIPS 2022) in JAX/Flax.

Importing the package imports nothing else (no jax, no TF): each module is imported where it is
used. pyproject.toml reads the version from here (one place).
"""

__version__ = "0.1.0"
