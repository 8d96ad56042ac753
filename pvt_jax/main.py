"""Train (or fine-tune) PVT v2.

  python -m pvt_jax.main --config=configs/b0.py --workdir=runs/b0
  python -m pvt_jax.main --config=configs/b2.py:imagenet --workdir=runs/b2 \\
      --config.data_dir=/data/tfds --config.batch_size=256

`--config=FILE[:ARG]` is a config file (see pvt_jax/configs/ for ARG); any of its fields can be
set with `--config.FIELD=VALUE`. A workdir with checkpoints is resumed from its latest one.
"""

# ruff: noqa: E402  (run as a tool, re-exec under tcmalloc before the heavy imports)
from pvt_jax.cpu import allocator

if __name__ == "__main__":
  allocator.reexec_with_tcmalloc()

import sys

from absl import app, flags
from ml_collections import config_flags

from pvt_jax.train import checkpointing, cli, loop

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "config file, e.g. configs/b0.py or configs/b2.py:imagenet", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, logs and plots")
flags.mark_flags_as_required(["config", "workdir"])
flags.adopt_module_key_flags(cli)  # --help lists the multi-process flags too


def main(argv) -> None:
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  config = cli.config_value(_CONFIG)
  cli.quiet_logging()
  cli.initialize_distributed()
  try:
    with cli.peer_loss_exits():
      result = loop.train_and_evaluate(config, _WORKDIR.value)
  except checkpointing.SaveError as error:
    cli.fail(str(error), abandon_threads=True)
  except cli.USER_ERRORS as error:
    cli.fail(str(error))
  except KeyboardInterrupt:
    cli.fail("interrupted; stopped without saving (rerun the command to resume from the latest "
             "checkpoint)", status=130)
  if result["preempted"]:
    print(f"stopped on {result['preempted']} at step {result['step']}; checkpoint saved "
          f"(rerun the same command to resume)", flush=True)
    if result["preempted"] == "SIGINT":
      sys.exit(130)


def run() -> None:
  app.run(main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
  run()
