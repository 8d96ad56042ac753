"""Evaluate a checkpoint: exact top-1 / top-5 over a whole split.

  python -m pvt_jax.evaluate --checkpoint=ckpt/pvt_v2_b0 --dataset=imagenet2012 \\
      --data_dir=/data/tfds
  python -m pvt_jax.evaluate --checkpoint=runs/b0                  # a training workdir

A converted checkpoint (python -m pvt_jax.convert) is evaluated with the official ImageNet eval
preprocessing (224 px, crop 0.875) unless flags say otherwise; a training workdir with its own
config (dataset, resolution), at its best checkpoint by top-1 (or --step). Prints one JSON line.
"""

# ruff: noqa: E402  (run as a tool, re-exec under tcmalloc before the heavy imports)
from pvt_jax.cpu import allocator

if __name__ == "__main__":
  allocator.reexec_with_tcmalloc()

import json
import os

import jax
import ml_collections
import numpy as np
from absl import app, flags

from pvt_jax import data
from pvt_jax.checkpoints import load_converted
from pvt_jax.checkpoints.errors import CheckpointError
from pvt_jax.configs import classification
from pvt_jax.train import checkpointing, cli, loop, sharding, steps
from pvt_jax.train.errors import ConfigError

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "a converted checkpoint directory or a training workdir")
flags.mark_flag_as_required("checkpoint")
flags.adopt_module_key_flags(cli)  # --help lists the multi-process flags too
_STEP = flags.DEFINE_integer("step", None, "training workdir: this step instead of the best")
_OVERRIDES = {
    "dataset": flags.DEFINE_string("dataset", None, "fashion_mnist, imagenet2012, any tfds name "
                                   "or folder:/path"),
    "eval_split": flags.DEFINE_string("split", None, "split to evaluate (default: validation, "
                                      "else test)"),
    "data_dir": flags.DEFINE_string("data_dir", None, "tfds data dir"),
    "fashion_mnist_dir": flags.DEFINE_string("fashion_mnist_dir", None,
                                             "directory of the Fashion-MNIST idx files"),
    "image_size": flags.DEFINE_integer("image_size", None, "eval resolution"),
    "crop_pct": flags.DEFINE_float("crop_pct", None, "center crop fraction"),
    "eval_batch_size": flags.DEFINE_integer("batch_size", None, "global eval batch size"),
    "dtype": flags.DEFINE_enum("dtype", None, list(loop.DTYPES), "compute dtype"),
}


def _converted_config(metadata: dict) -> ml_collections.ConfigDict:
  config = classification.get_config(metadata["variant"], "imagenet")  # official eval transform
  config.num_classes = metadata["num_classes"]
  config.eval_batch_size = 128
  return config


def _load(path: str):
  """(config, params, step) from a training workdir or (config, params, None) from a converted
  checkpoint."""
  if os.path.isfile(os.path.join(path, loop.CONFIG_FILE)):
    config = ml_collections.ConfigDict(loop.load_workdir_config(path))
    ckpts = checkpointing.TrainCheckpoints(path, read_only=True)
    step = _STEP.value if _STEP.value is not None else (ckpts.best_step() or ckpts.latest_step())
    if step is None or step not in ckpts.all_steps():
      raise CheckpointError(f"no checkpoint for step {step}", path)
    setup = loop.create_setup(config)
    target = checkpointing.abstract_like(setup.abstract_state, setup.state_shardings)
    return config, ckpts.restore(target, step)["params"], step
  checkpoint = load_converted(path)
  return _converted_config(checkpoint.metadata), checkpoint.params, None


def main(argv) -> None:
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  cli.quiet_logging()
  cli.initialize_distributed()
  path = os.path.abspath(_CHECKPOINT.value)
  try:
    if not os.path.isdir(path):
      raise CheckpointError("no such checkpoint directory", path)
    config, params, step = _load(path)
    for field, flag in _OVERRIDES.items():
      if flag.value is not None:
        config[field] = flag.value
    result = evaluate_params(config, params)
  except cli.USER_ERRORS as error:
    cli.fail(str(error))
  if jax.process_index() == 0:
    print(json.dumps({"checkpoint": path, "step": step, "dataset": config.dataset, **result}))


def evaluate_params(config, params) -> dict:
  """Top-1 / top-5 / loss of `params` (any host or device arrays) on config's eval split."""
  info = data.dataset_info(config)
  num_classes = config.num_classes or info.num_classes
  if num_classes != info.num_classes:
    raise ConfigError(f"the checkpoint has {num_classes} classes but {config.dataset} has "
                           f"{info.num_classes}")
  mesh = sharding.create_mesh(config.mesh.data, config.mesh.fsdp)
  sharding.check_batch_size(config.eval_batch_size or config.batch_size, "eval_batch_size")
  model = loop.create_model_from_config(config, num_classes)
  params_shardings = sharding.state_shardings(params, mesh)
  params = jax.tree.map(
      lambda x, s: x if isinstance(x, jax.Array) else loop.global_array(np.asarray(x), s),
      params, params_shardings)
  eval_step = steps.make_eval_step(model, mesh, params_shardings)
  return loop.evaluate(eval_step, params, config, mesh)


def run() -> None:
  app.run(main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
  run()
