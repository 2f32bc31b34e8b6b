"""The error a run stops with for a reason the user can fix; `main` prints it as one line.

Config and data errors are `ValueError`s naming their field or record (`fields.FieldError`,
`configuration.ConfigError`); `RunError` covers what only shows while running: a workdir another
run holds, a filter that keeps nothing, checkpoints that do not match the config.
"""


class RunError(RuntimeError):
  """A run cannot go on; the message says why and what to change, in one line."""
