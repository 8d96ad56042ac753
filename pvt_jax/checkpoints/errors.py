"""The one exception type of checkpoint handling; the CLI prints it as `error: <file>: <what>`."""


class CheckpointError(Exception):
  """A checkpoint that cannot be read, recognised or converted; the message is one line."""

  def __init__(self, message: str, path=None):
    super().__init__(f"{path}: {message}" if path else message)
    self.message = message
    self.path = path

  def at(self, path) -> "CheckpointError":
    """The same error attributed to `path`, unless it already names a file."""
    return self if self.path else CheckpointError(self.message, path)
