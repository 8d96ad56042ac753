"""The one exception type of the data pipeline."""


class DatasetError(Exception):
  """Bad dataset input (unknown name, missing files, empty folder, corrupt image): one line."""
