"""Entry point: `python -m openvlthinker.main --config=configs/default.py --workdir=DIR`.

Parses the ml_collections config (with `--config.a.b=value` overrides), validates it before anything
compiles, builds the mesh, and runs the requested mode.
"""
from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from openvlthinker import configuration

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and plots go.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() first (multi-host TPU pods, where "
    "it finds the coordinator itself; elsewhere set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and "
    "JAX_PROCESS_ID).")
_MODE = flags.DEFINE_enum("mode", "all", ["sft", "rl", "eval", "all", "forward"],
                          "What to run: SFT, RL, evaluation, SFT then RL (all), or one forward "
                          "pass as a smoke test.")


def _fail(message: str):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:  # orbax and grain log every save at INFO.
    logging.set_verbosity(logging.WARNING)
  if _CONFIG.value is None:
    _fail("--config: expected a config file such as configs/default.py")
  if _WORKDIR.value is None:
    _fail("--workdir: expected a directory for checkpoints and metrics")
  try:
    config = configuration.validate(_CONFIG.value)
  except configuration.ConfigError as e:
    _fail(str(e))
  if _DISTRIBUTED.value:
    import jax  # pylint: disable=g-import-not-at-top
    jax.distributed.initialize()
  from openvlthinker.train import runner  # Imported late: the config must validate first.
  runner.run(config, _WORKDIR.value, _MODE.value)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, with a bad `--config.x=v` override reported as one line naming the field."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # config_flags raises KeyError/AttributeError/ValueError/flags.Error.
    bad = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    lines = [l.strip("'\" ") for l in str(e).replace("\\n", "\n").splitlines() if l.strip()]
    hint = next((l for l in lines if l.startswith("Did you mean")), "")
    field = next((b for b in bad if any(b.split(".")[-1] in l for l in lines)), "--config")
    if hint:
      _fail(f"{field}: no such config field ({hint.rstrip('?')})")
    _fail(f"{field}: {lines[-1] if lines else type(e).__name__}")


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
