"""Entry point: `python -m openvlthinker.main --config=configs/default.py --workdir=DIR`.

Parses the ml_collections config (with `--config.a.b=value` overrides), validates it before anything
compiles, builds the mesh, and runs the requested mode. Every error a user can cause (a config
field, a data record or file, a workdir, a checkpoint) ends the run with one line,
`error: <field or file:line>: ...`; `--verbose` adds the traceback.
"""
from __future__ import annotations

import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

from openvlthinker import configuration
from openvlthinker.errors import RunError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and plots go.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Start JAX's multi-controller runtime first, one process per host: on "
    "a TPU pod it finds the coordinator itself; elsewhere JAX_COORDINATOR_ADDRESS, "
    "JAX_NUM_PROCESSES and JAX_PROCESS_ID say where it is and which process this is (they start "
    "it without the flag too; launch/local_multiprocess.sh sets them).")
_VERBOSE = flags.DEFINE_bool(
    "verbose", False, "On an error, print its traceback after the one-line message (and keep "
    "the libraries' INFO logs).")
_MODE = flags.DEFINE_enum("mode", "all", ["sft", "rl", "eval", "all", "forward"],
                          "What to run: SFT, RL, evaluation, SFT then RL (all), or one forward "
                          "pass as a smoke test.")


def _fail(message: str):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _one_line(e: BaseException) -> str:
  lines = [l for l in str(e).splitlines() if l.strip()]
  text = lines[0] if lines else type(e).__name__
  return text + (" …" if len(lines) > 1 else "")


def main(argv):
  del argv
  if not (flags.FLAGS["verbosity"].present or _VERBOSE.value):  # orbax, grain log saves at INFO.
    logging.set_verbosity(logging.WARNING)
  if _CONFIG.value is None:
    _fail("--config: expected a config file such as configs/default.py")
  if _WORKDIR.value is None:
    _fail("--workdir: expected a directory for checkpoints and metrics")
  if "://" in _WORKDIR.value:  # every host must see the same files: a shared mount
    _fail(f"--workdir: expected {configuration.MOUNT_HINT}, got {_WORKDIR.value!r}")
  try:
    config = configuration.validate(_CONFIG.value, _MODE.value)
  except configuration.ConfigError as e:
    _fail(str(e))
  try:
    # Before anything touches a device: the runtime decides what jax.devices() is.
    from openvlthinker import multihost  # pylint: disable=g-import-not-at-top
    multihost.initialize(_DISTRIBUTED.value)
  except ValueError as e:
    _fail(_one_line(e))
  try:
    from openvlthinker.train import runner  # Imported late: the config must validate first.
    runner.run(config, _WORKDIR.value, _MODE.value)
  except (ValueError, OSError, RunError) as e:
    # What a user can cause (a field, a record, a file, a workdir) names itself in its message;
    # the traceback helps only someone debugging the code.
    if _VERBOSE.value:
      traceback.print_exc()
    _fail(_one_line(e))
  except KeyboardInterrupt:
    print("interrupted (a second Ctrl-C stops without saving)", file=sys.stderr)
    sys.exit(130)


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
