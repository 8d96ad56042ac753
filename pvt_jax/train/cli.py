"""What the training CLIs share: one-line errors, flag parsing and multi-process start-up."""

import ast
import contextlib
import difflib
import glob
import logging as std_logging
import os
import re
import sys

import jax
from absl import flags, logging

from pvt_jax.checkpoints.errors import CheckpointError
from pvt_jax.data import DatasetError
from pvt_jax.train import checkpointing
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
flags.DEFINE_integer("distributed_timeout_s", 100,
                     "multi-process runs: seconds without a heartbeat after which a process "
                     "counts as dead and the others stop (JAX's heartbeat timeout)",
                     lower_bound=1)

# How a collective reports a peer that died (gloo on CPU, the coordination service elsewhere).
_PEER_LOST = re.compile(r"(Gloo \S+ failed|Connection (closed|reset) by peer|heartbeat timeout"
                        r"|tasks are unhealthy)")


def fail(message: str, status: int = 1, *, abandon_threads: bool = False) -> None:
  """Prints `error: message` and exits. `abandon_threads` exits at once, without waiting for
  background threads (e.g. the writes of a failed checkpoint, which would only report their
  failure again, with tracebacks, while the interpreter shuts down)."""
  print(f"error: {message}", file=sys.stderr)
  if abandon_threads:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
  sys.exit(status)


def _unknown_field(path: str, message: str = "") -> str:
  """"unknown config field 'batch_sise'; did you mean 'batch_size'?" (the suggestion from the
  config library's message, else the closest field name)."""
  suggested = re.search(r'Did you mean "([^"]+)"', message)
  if suggested:
    leaf = path.rsplit(".", 1)[-1]
    suggestion = path[:len(path) - len(leaf)] + suggested.group(1)
  else:
    fields = [name[len("config."):] for name in flags.FLAGS if name.startswith("config.")]
    suggestion = next(iter(difflib.get_close_matches(path, fields, n=1)), None)
  hint = f"; did you mean {suggestion!r}?" if suggestion else ""
  return f"unknown config field {path!r}{hint}"


def _flag_error_line(error: Exception) -> str:
  """absl/config_flags errors can carry a whole traceback; keep what names the problem."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  if not lines:
    return type(error).__name__
  unknown = re.match(r"Unknown command line flag 'config\.(.+)'", lines[0])
  if unknown:
    return _unknown_field(unknown.group(1), str(error))
  missing = re.match(r"flag --config=([^:]+)(:\S*)?: Failed loading config file", lines[0])
  if missing and "No such file" in lines[-1]:
    return missing_config_file(missing.group(1))
  if len(lines) > 1 and lines[-1] != lines[0]:  # "...: Error whilst parsing config file:" + tb
    cause = re.sub(r"^\w+(Error|Exception): ", "", lines[-1])
    return f"{lines[0].split(': ')[0]}: {cause}"
  return lines[0]


def missing_config_file(path: str) -> str:
  """One line for a --config file that does not exist, listing the ones beside it."""
  directory = os.path.dirname(path) or "."
  found = sorted(glob.glob(os.path.join(directory, "*.py")))
  found = [f for f in found if not os.path.basename(f).startswith("_")]
  listing = f"; config files in {directory}/: {', '.join(found)}" if found else ""
  return f"no config file {path}{listing}"


def parse_flags(argv):
  """absl flag parsing with bad flags (e.g. an unknown config field) as one `error:` line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as error:
    fail(_flag_error_line(error))
  except (AttributeError, KeyError) as error:  # config_flags on `--config.nosuch=...`
    message = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
    if message[:1] in "'\"":  # config_flags re-raises the config's KeyError quoted, as str()
      with contextlib.suppress(ValueError, SyntaxError):
        message = ast.literal_eval(message)
    name = message.splitlines()[0].strip("'\"")
    paths = [arg.split("=")[0][len("--config."):] for arg in argv if arg.startswith("--config.")]
    fail(_unknown_field(next((p for p in paths if p.endswith(name)), name), message))


def config_value(config_flag):
  """The --config flag's value: config files are loaded on first use, so a missing one is
  reported here, in one line."""
  try:
    config = config_flag.value
    config.keys()  # a file that failed to load gives a stand-in that raises on first use
    return config
  except OSError:
    argv = sys.argv
    given = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if given is None and "--config" in argv[:-1]:
      given = argv[argv.index("--config") + 1]
    fail(missing_config_file((given or "").split(":")[0]))


def _unraisable_unless_closed_loop(unraisable) -> None:
  """After a failed save, the writes still in flight complete into orbax's event loop, already
  closed, and each such callback reports "Event loop is closed"; the failure itself is ours to
  report, in one line."""
  if not (isinstance(unraisable.exc_value, RuntimeError)
          and str(unraisable.exc_value) == "Event loop is closed"):
    sys.__unraisablehook__(unraisable)


def quiet_logging() -> None:
  """Warnings only, unless --verbosity was given: orbax logs every save at INFO, and its
  reports of failed saves are ours to make (in one line)."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
    std_logging.getLogger("absl").addFilter(checkpointing.orbax_errors_reported_by_us)
    sys.unraisablehook = _unraisable_unless_closed_loop


def _cluster_detected() -> bool:
  env = os.environ
  return (int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
          or "," in env.get("TPU_WORKER_HOSTNAMES", ""))


def initialize_distributed() -> None:
  """jax.distributed from the explicit flags, or from the cluster environment when there is one."""
  f = flags.FLAGS
  timeouts = {"heartbeat_timeout_seconds": f.distributed_timeout_s}
  if f.coordinator_address:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU cross-process
    jax.distributed.initialize(coordinator_address=f.coordinator_address,
                               num_processes=f.num_processes, process_id=f.process_id, **timeouts)
  elif f.distributed or _cluster_detected():
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**timeouts)


@contextlib.contextmanager
def peer_loss_exits():
  """A collective that fails because another process died ends this one at once, in one line.

  Without it the error is a traceback, and then JAX's exit handler waits at the shutdown barrier
  for the dead peer until its heartbeat times out and aborts the process ("Fatal Python error:
  Aborted", tens of lines). The peer is named as the collective names it (gloo: its address);
  which process id it was, the coordination service only knows after the heartbeat timeout.
  """
  try:
    yield
  except Exception as error:
    found = _PEER_LOST.search(str(error)) if jax.process_count() > 1 else None
    if found is None:
      raise
    line = next(line for line in str(error).splitlines() if found.group(0) in line)
    line = re.sub(r"^[A-Z_]+: |\[[\w/.]+:\d+\] ", "", line.strip())  # status, gloo source
    fail(f"process {jax.process_index()} of {jax.process_count()}: another process stopped "
         f"({line}); stopped without saving (restart all processes to resume from the latest "
         f"checkpoint)", abandon_threads=True)
