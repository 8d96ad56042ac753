"""The one exception type of the data pipeline, and TensorFlow's messages made one line."""

import re


class DatasetError(Exception):
  """Bad dataset input (unknown name, missing files, empty folder, corrupt image): one line."""


def tf_reason(message: str) -> str:
  """The reason in a TensorFlow error message: its first line without the op's and tf.data's
  wrapping ("{{function_node __wrapped__DecodeImage...}}", "[Op:DecodeImage] name:", "Error in
  user-defined function passed to ... with iterator: Iterator::Root::...: ")."""
  line = message.strip().splitlines()[0] if message.strip() else message
  line = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", line)
  line = re.sub(r"^Error in user-defined function .*? with iterator: \S+: ", "", line)
  return re.sub(r"\s*\[Op:[^\]]*\].*$", "", line).strip()
