"""Evaluate a checkpoint over a whole split: exact top-1 / top-5, or mIoU for segmentation.

  python -m pvt_jax.evaluate --checkpoint=ckpt/pvt_v2_b0 --dataset=imagenet2012 \\
      --data_dir=/data/tfds
  python -m pvt_jax.evaluate --checkpoint=ckpt/fpn_b2 --dataset=ade20k:/data/ADEChallengeData2016
  python -m pvt_jax.evaluate --checkpoint=runs/b0                  # a training workdir

A converted checkpoint (python -m pvt_jax.convert) is evaluated with the official eval
preprocessing of its task (ImageNet: 224 px, crop 0.875; a Semantic FPN: ADE20K's whole-image
AlignResize to short side 512) unless flags say otherwise; a training workdir with its own
config (task, dataset, resolution), at its best checkpoint by the task's metric (top-1 for
classification) or --step; only its parameters (and BatchNorm statistics) are read, not the
optimizer state. Prints one JSON line.
"""

# ruff: noqa: E402  (run as a tool, re-exec under tcmalloc before the heavy imports)
from pvt_jax.cpu import allocator

if __name__ == "__main__":
  allocator.reexec_with_tcmalloc()

import json
import os

import jax
import ml_collections
from absl import app, flags

from pvt_jax.checkpoints import load_converted
from pvt_jax.checkpoints.errors import CheckpointError
from pvt_jax.configs import classification, segmentation
from pvt_jax.train import checkpointing, cli, loop, sharding, steps, validation, workdir
from pvt_jax.train.errors import ConfigError

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "a converted checkpoint directory or a training workdir")
flags.mark_flag_as_required("checkpoint")
flags.adopt_module_key_flags(cli)  # --help lists the multi-process flags too
_STEP = flags.DEFINE_integer("step", None, "training workdir: this step instead of the best")
_OVERRIDES = {
    "dataset": flags.DEFINE_string("dataset", None, "fashion_mnist, imagenet2012, any tfds name "
                                   "or folder:/path; segmentation: ade20k:/path, "
                                   "fashion_mnist_seg, scene_parse150 or folder:/path"),
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


def _converted_config(checkpoint) -> ml_collections.ConfigDict:
  metadata = checkpoint.metadata
  if checkpoint.task == "segmentation":  # the official ADE20K eval pipeline
    config = segmentation.get_config(metadata["variant"], "ade20k")
  else:
    config = classification.get_config(metadata["variant"], "imagenet")  # official eval transform
    config.eval_batch_size = 128
  config.num_classes = metadata["num_classes"]
  return config


def _workdir_step(path: str, task) -> tuple[checkpointing.TrainCheckpoints, int]:
  """The workdir's checkpoints and the step to evaluate: --step, else the best, else the last."""
  ckpts = checkpointing.TrainCheckpoints(path, task.best_metric, read_only=True)
  step = _STEP.value if _STEP.value is not None else (ckpts.best_step() or ckpts.latest_step())
  if step is None or step not in ckpts.all_steps():
    raise CheckpointError(f"no checkpoint for step {step}", path)
  return ckpts, step


def evaluate_checkpoint(path: str) -> tuple[dict, ml_collections.ConfigDict, int | None]:
  """(metrics, config, step) of a training workdir's checkpoint (step None: a converted one),
  with the command-line overrides applied to its config."""
  is_workdir = os.path.isfile(os.path.join(path, workdir.CONFIG_FILE))
  checkpoint = None
  if is_workdir:
    config = workdir.load_run_config(path)
  else:
    checkpoint = load_converted(path)
    config = _converted_config(checkpoint)
  for field, flag in _OVERRIDES.items():
    if flag.value is not None:
      config[field] = flag.value
  task = validation.check_eval_config(config)
  setup = loop.create_setup(config, task)
  if setup.num_classes != setup.info.num_classes:
    raise ConfigError(f"the checkpoint has {setup.num_classes} classes but {config.dataset} has "
                      f"{setup.info.num_classes}")
  shardings = steps.model_variables(setup.state_shardings)
  if is_workdir:  # the parameters and collections only, not the optimizer state
    ckpts, step = _workdir_step(path, task)
    abstract = checkpointing.abstract_like(steps.model_variables(setup.abstract_state), shardings)
    variables = ckpts.restore_part(abstract, step)
    ckpts.close()
  else:
    step = None
    variables = sharding.to_global(checkpoint.variables,
                                   {name: shardings[name] for name in checkpoint.variables})
  eval_step = steps.make_eval_step(task, setup.model, setup.mesh, shardings)
  return loop.evaluation_pass(setup, eval_step, variables, config).result(), config, step


def main(argv) -> None:
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  cli.quiet_logging()
  cli.initialize_distributed()
  path = os.path.abspath(_CHECKPOINT.value)
  try:
    if not os.path.isdir(path):
      raise CheckpointError("no such checkpoint directory", path)
    result, config, step = evaluate_checkpoint(path)
  except cli.USER_ERRORS as error:
    cli.fail(str(error))
  if jax.process_index() == 0:
    print(json.dumps({"checkpoint": path, "step": step, "dataset": config.dataset, **result}))


def run() -> None:
  app.run(main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
  run()
