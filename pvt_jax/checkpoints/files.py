"""Reading and writing PyTorch checkpoint files without executing their contents.

`.safetensors` goes through the safetensors library (no torch needed); PyTorch pickles (`.pth`,
`.pt`, `.bin`) only through `torch.load(weights_only=True)`, which refuses anything but tensors and
plain containers, so a malicious pickle cannot run code. torch is imported only for those files.
The kind of file is read from its first bytes, not trusted from its suffix.
"""

import hashlib
import json
import os
import pickle
import struct
import tempfile
import warnings

import numpy as np
import safetensors
import safetensors.numpy

from pvt_jax.checkpoints.errors import CheckpointError

TORCH_SUFFIXES = (".pth", ".pt", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"
_WRAPPERS = ("model", "state_dict")  # official training checkpoints keep the weights under 'model'


def sha256(path) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def _kind(path: str) -> str:
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(9)
  if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":  # torch zip archive, or legacy pickle
    return "torch"
  if len(head) == 9 and head[8:9] == b"{":  # safetensors: u64 header length, then a JSON header
    header_size = struct.unpack("<Q", head[:8])[0]
    if 8 + header_size > size:
      raise CheckpointError(f"truncated safetensors file: the header alone needs "
                            f"{8 + header_size} bytes, the file has {size}")
    return "safetensors"
  raise CheckpointError("not a checkpoint: neither a safetensors file nor a PyTorch pickle/zip")


def _one_line(error: Exception) -> str:
  """The first sentence of an exception's message: library messages can run to paragraphs."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return lines[0].split(". ")[0].rstrip(".") if lines else type(error).__name__


def _read_safetensors(path: str) -> dict:
  try:
    return safetensors.numpy.load_file(path)
  except (safetensors.SafetensorError, json.JSONDecodeError, ValueError, TypeError) as error:
    raise CheckpointError(f"unreadable safetensors file, truncated or corrupt "
                          f"({_one_line(error)})") from None


def _refusal(error: Exception) -> str:
  """torch's weights_only refusal spans many lines; keep the one naming the forbidden object."""
  lines = str(error).splitlines()
  named = [line.strip() for line in lines if "Unsupported" in line or "global" in line.lower()]
  return (named or [_one_line(error)])[0]


def _read_torch(path: str):
  try:
    import torch  # optional: only pickled checkpoints need it
  except ImportError:
    raise CheckpointError("reading PyTorch pickles needs torch (pip install torch); or pass "
                          "a .safetensors file") from None
  try:
    # A file object, not the path: torch.load hands any path ending in .safetensors to the
    # safetensors reader, whatever the file holds; its kind was read from its bytes already.
    with open(path, "rb") as f, warnings.catch_warnings():
      # Its note on plain pickles of another protocol precedes our own one-line verdict.
      warnings.filterwarnings("ignore", message="Detected pickle protocol")
      return torch.load(f, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as error:
    if "Weights only load failed" in str(error):
      raise CheckpointError(f"refused to unpickle: the file holds more than tensors, which "
                            f"torch.load(weights_only=True) will not execute ({_refusal(error)})"
                            ) from None
    raise CheckpointError(f"corrupt PyTorch pickle ({_one_line(error)})") from None
  except (RuntimeError, EOFError, ValueError, OSError) as error:
    raise CheckpointError(f"unreadable PyTorch file, truncated or corrupt "
                          f"({_one_line(error)})") from None


def _to_numpy(state_dict: dict) -> dict:
  import torch  # already imported by _read_torch

  out = {}
  for key, value in state_dict.items():
    if not isinstance(value, torch.Tensor):
      raise CheckpointError(f"entry {key!r} is a {type(value).__name__}, not a tensor")
    value = value.detach().cpu()
    out[key] = (value.float() if value.dtype == torch.bfloat16 else value).numpy()
  return out


def read_state_dict(path) -> dict[str, np.ndarray]:
  """A checkpoint file's tensors as numpy arrays, unwrapped from {'model': ...} and the like."""
  path = os.fspath(path)
  try:
    if not os.path.isfile(path):
      raise CheckpointError("no such file" if not os.path.exists(path) else "not a file")
    if _kind(path) == "safetensors":
      return _read_safetensors(path)
    obj = _read_torch(path)
    for wrapper in _WRAPPERS:
      if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
        obj = obj[wrapper]
    if not isinstance(obj, dict):
      raise CheckpointError(f"holds a {type(obj).__name__}, not a state dict")
    return _to_numpy(obj)
  except CheckpointError as error:
    raise error.at(path) from None
  except OSError as error:
    raise CheckpointError(error.strerror or _one_line(error), path) from None


def write_state_dict(path, state_dict: dict) -> None:
  """Writes .safetensors (no torch needed) or a .pth/.pt/.bin pickle of tensors, atomically."""
  path = os.fspath(path)
  suffix = os.path.splitext(path)[1]
  if suffix not in (SAFETENSORS_SUFFIX, *TORCH_SUFFIXES):
    raise CheckpointError(f"unknown output suffix {suffix!r}; use {SAFETENSORS_SUFFIX} or "
                          f"{'/'.join(TORCH_SUFFIXES)}", path)
  if os.path.exists(path):
    raise CheckpointError("already exists; remove it or choose another name", path)
  # np.asarray(order="C"), not np.ascontiguousarray: that makes 0-d counters 1-d.
  arrays = {key: np.asarray(value, order="C") for key, value in state_dict.items()}
  if suffix == SAFETENSORS_SUFFIX:
    write = safetensors.numpy.save_file
  else:
    try:
      import torch  # optional: only pickled checkpoints need it
    except ImportError:
      raise CheckpointError("writing PyTorch pickles needs torch; write .safetensors instead",
                            path) from None
    arrays = {key: torch.from_numpy(value) for key, value in arrays.items()}
    write = torch.save
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  os.close(fd)
  try:
    write(arrays, tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
