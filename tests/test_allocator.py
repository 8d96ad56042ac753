"""The command-line tools re-exec under tcmalloc, which stops XLA:CPU page-faulting every step."""

import os
import subprocess
import sys

import pytest

from pvt_jax.cpu import allocator

# Re-execs itself like the CLIs do, then reports the allocator and the page faults of the third
# call of a jitted function whose ~200 MiB of temporaries are allocated by XLA's worker threads.
SCRIPT = """
from pvt_jax.cpu import allocator
allocator.reexec_with_tcmalloc()
import resource
import jax, jax.numpy as jnp
x = jnp.ones((64, 1024, 1024), jnp.float32)
f = jax.jit(lambda x: (lambda y: y.sum(axis=0) + y.sum(axis=(0, 1)))(jnp.sin(x) ** 2))
f(x).block_until_ready(); f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
f(x).block_until_ready()
print(allocator.active_allocator(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _run(**env):
  env = {k: v for k, v in dict(os.environ, **env).items() if v is not None}
  proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  name, faults = proc.stdout.split()
  return name, int(faults)


@pytest.fixture(scope="module")
def tcmalloc_installed():
  if allocator.tcmalloc_path() is None:
    pytest.fail("tcmalloc is not installed: apt-get install libtcmalloc-minimal4 (see README)")


def test_reexec_runs_under_tcmalloc_and_steps_stop_page_faulting(tcmalloc_installed):
  name, faults = _run(LD_PRELOAD=None, PVT_JAX_TCMALLOC=None, PVT_JAX_TCMALLOC_EXEC=None)
  assert name == "tcmalloc"
  assert faults < 2000  # 4 KiB pages: 200 MiB of fresh temporaries would be ~50,000 faults


def test_opting_out_keeps_the_default_allocator_which_faults_every_step(tcmalloc_installed):
  name, faults = _run(LD_PRELOAD=None, PVT_JAX_TCMALLOC="0")
  assert name == "default"
  assert faults > 20000  # why the re-exec exists
