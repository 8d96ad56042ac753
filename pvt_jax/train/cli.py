"""What the training CLIs share: one-line errors, flag parsing and multi-process start-up."""

import os
import re
import sys

import jax
from absl import flags, logging

from pvt_jax.checkpoints.errors import CheckpointError
from pvt_jax.data import DatasetError
from pvt_jax.train.errors import ConfigError, NonFiniteLossError

# Errors that are the user's input or the run's outcome, not bugs: reported without a traceback.
USER_ERRORS = (ConfigError, NonFiniteLossError, DatasetError, CheckpointError)

flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0 for multi-process runs without a cluster manager "
                    "(TPU pods, SLURM and Open MPI are detected automatically)")
flags.DEFINE_integer("num_processes", None, "number of processes (with --coordinator_address)")
flags.DEFINE_integer("process_id", None, "this process's index (with --coordinator_address)")
flags.DEFINE_bool("distributed", False,
                  "always call jax.distributed.initialize() and let JAX find the cluster: for TPU "
                  "pods, whose workers learn their peers from the metadata server, not the "
                  "environment (launch/tpu_pod.sh passes it)")


def fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(1)


def _flag_error_line(error: Exception) -> str:
  """absl/config_flags errors can carry a whole traceback; keep what names the problem."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  if not lines:
    return type(error).__name__
  unknown = re.match(r"Unknown command line flag 'config\.(.+)'", lines[0])
  if unknown:
    return f"unknown config field {unknown.group(1)!r}"
  if len(lines) > 1 and lines[-1] != lines[0]:  # "...: Error whilst parsing config file:" + tb
    cause = re.sub(r"^\w+(Error|Exception): ", "", lines[-1])
    return f"{lines[0].split(': ')[0]}: {cause}"
  return lines[0]


def parse_flags(argv):
  """absl flag parsing with bad flags (e.g. an unknown config field) as one `error:` line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as error:
    fail(_flag_error_line(error))
  except (AttributeError, KeyError) as error:  # config_flags on `--config.nosuch=...`
    name = str(error).strip("'\"")
    paths = [arg.split("=")[0][len("--config."):] for arg in argv if arg.startswith("--config.")]
    fail(f"unknown config field {next((p for p in paths if p.endswith(name)), name)!r}")


def quiet_logging() -> None:
  """Warnings only, unless --verbosity was given: orbax logs every save at INFO."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def _cluster_detected() -> bool:
  env = os.environ
  return (int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
          or "," in env.get("TPU_WORKER_HOSTNAMES", ""))


def initialize_distributed() -> None:
  """jax.distributed from the explicit flags, or from the cluster environment when there is one."""
  f = flags.FLAGS
  if f.coordinator_address:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU cross-process
    jax.distributed.initialize(coordinator_address=f.coordinator_address,
                               num_processes=f.num_processes, process_id=f.process_id)
  elif f.distributed or _cluster_detected():
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize()
