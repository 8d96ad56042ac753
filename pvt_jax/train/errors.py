"""Errors the training CLIs report as one `error: ...` line instead of a traceback."""


class ConfigError(ValueError):
  """A configuration that cannot run (e.g. a batch that does not split over the devices)."""


class NonFiniteLossError(RuntimeError):
  """Training produced a NaN/inf loss; the last good checkpoint is kept."""
