"""openvlthinker: Gaussian GRPO (G²RPO) and task-level shaping for vision-language models in JAX."""

__version__ = "0.1.0"
