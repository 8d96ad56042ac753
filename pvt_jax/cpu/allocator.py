"""Run the command-line tools under tcmalloc when installed (`apt install libtcmalloc-minimal4`).

XLA:CPU allocates each step's temporaries (GiBs when training) from its worker threads. glibc
serves those from per-thread arenas, which hand every block over 64 MiB to mmap and return it to
the OS when freed, so each step page-faults through all of its activations again: 1.2M page
faults per B2 training step here, half of its time. tcmalloc keeps freed pages for reuse.
LD_PRELOAD is only read when a process starts, hence the re-exec. PVT_JAX_TCMALLOC=0 opts out.
"""

import ctypes.util
import os
import sys

_DONE = "PVT_JAX_TCMALLOC_EXEC"


def tcmalloc_path() -> str | None:
  """The installed tcmalloc library's name, if the dynamic loader can find one."""
  return ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")


def active_allocator() -> str:
  """'tcmalloc' when it is mapped into this process, else 'default'."""
  try:
    with open("/proc/self/maps") as maps:
      return "tcmalloc" if "tcmalloc" in maps.read() else "default"
  except OSError:  # not Linux
    return "default"


def reexec_with_tcmalloc() -> None:
  """Replace this process by the same command with tcmalloc preloaded (once; no-op if absent)."""
  if (os.environ.get("PVT_JAX_TCMALLOC") == "0" or os.environ.get(_DONE)
      or "tcmalloc" in os.environ.get("LD_PRELOAD", "")):  # e.g. TPU VM images preload it
    return
  library = tcmalloc_path()
  if library is None:
    return
  preload = " ".join(filter(None, [library, os.environ.get("LD_PRELOAD")]))
  env = dict(os.environ, LD_PRELOAD=preload, **{_DONE: "1"})
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, env)
