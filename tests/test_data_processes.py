"""The process count does not change the experiment: the global batch of every step is the same
examples with the same augmentation on 1, 2 or 4 processes, and a 2-process run (jax.distributed
over localhost) trains the same parameters as 1 process with the same devices."""

import itertools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_data_sources import make_config
from test_train import (
  REPO,
  WHOLE_BATCH,
  config_flags,
  enable_compile_cache,
  relative_error,
  restore_params,
  subprocess_env,
  tiny_config,
)
from test_train_parallel import free_port, history

from pvt_jax import data
from pvt_jax.configs import classification
from pvt_jax.data import batch_augment
from pvt_jax.tasks.classification import ClassificationTask
from pvt_jax.train import loop
from pvt_jax.train.errors import ConfigError

# The official recipe minus RandAugment (its graph is slow to build; it is seeded like the rest).
RECIPE = {"random_resized_crop": True, "hflip": True, "randaugment": "", "random_erasing": 0.25,
          "mixup_alpha": 0.8, "cutmix_alpha": 1.0, "mixup_prob": 1.0, "repeated_aug": 3}


def global_batches(config, process_count, steps, start_step=0):
  """The global batches of `steps` steps: the processes' batches concatenated in order."""
  per_process = [list(itertools.islice(
      data.train_iterator(config, start_step, process_index=i, process_count=process_count),
      steps)) for i in range(process_count)]
  return [{k: np.concatenate([p[s][k] for p in per_process]) for k in ("image", "label")}
          for s in range(steps)]


@pytest.mark.slow
def test_global_batches_do_not_depend_on_the_process_count(tiny_fashion_mnist, tfds_data_dir):
  config = make_config(fashion_mnist_dir=tiny_fashion_mnist, data_dir=tfds_data_dir,
                       batch_size=16, image_size=32)
  config.aug.update(RECIPE)
  # 200 // 16 = 12 steps per epoch: steps 11-13 cross into the second epoch.
  one = global_batches(config, 1, 3, start_step=11)
  for count in (2, 4):
    many = global_batches(config, count, 3, start_step=11)
    for step, (a, b) in enumerate(zip(one, many, strict=True), 11):
      np.testing.assert_array_equal(a["image"], b["image"], err_msg=f"{count} processes {step}")
      np.testing.assert_array_equal(a["label"], b["label"], err_msg=f"{count} processes {step}")
  assert not np.array_equal(one[0]["image"], one[1]["image"])


def test_mixup_pairs_examples_within_each_group_of_mixup_batch():
  """Groups of aug.mixup_batch examples mix among themselves with their own draw (timm mixes
  each GPU's batch), on the global batch in the train step."""
  images = jax.random.normal(jax.random.key(0), (12, 8, 8, 3))
  labels = jnp.arange(12)
  kwargs = {"mixup_alpha": 0.8, "cutmix_alpha": 0.0, "prob": 1.0, "switch_prob": 0.5,
            "smoothing": 0.1}
  out = batch_augment.mixup_cutmix(jax.random.key(1), images, labels, group=4, **kwargs)
  partners = np.asarray(out["label"][:, 1]).reshape(3, 4)
  np.testing.assert_array_equal(partners, np.arange(12).reshape(3, 4)[:, ::-1])
  lams = np.asarray(out["label_weight"][:, 0]).reshape(3, 4)
  assert (lams == lams[:, :1]).all() and len(set(lams[:, 0])) == 3  # one draw per group
  whole = batch_augment.mixup_cutmix(jax.random.key(1), images, labels, group=12, **kwargs)
  np.testing.assert_array_equal(whole["label"][:, 1], labels[::-1])
  with pytest.raises(ValueError, match="not whole groups of 5"):
    batch_augment.mixup_cutmix(jax.random.key(1), images, labels, group=5, **kwargs)


def test_mixup_batch_must_divide_the_batch():
  config = classification.get_config("b0", "runlocal")
  config.batch_size, config.aug.mixup_batch = 12, 8
  with pytest.raises(ConfigError, match="aug.mixup_batch=8 must be a positive divisor"):
    ClassificationTask().check_config(config)
  config.aug.mixup_batch = 128  # at least the batch: one group
  ClassificationTask().check_config(config)


# WHOLE_BATCH's model and optimizer with the whole train split and the augmentation on: each
# step draws 32 of the 200 images, so which examples form a batch (and how they are augmented
# and mixed) decides the trajectory.
AUGMENTED = {**WHOLE_BATCH, "train_split": "train", "aug.random_resized_crop": True,
             "aug.hflip": True, "aug.random_erasing": 0.25, "aug.mixup_alpha": 0.8,
             "aug.cutmix_alpha": 1.0, "aug.mixup_prob": 1.0, "aug.repeated_aug": 3,
             "aug.mixup_batch": 16}


@pytest.fixture(scope="module")
def compile_cache():
  return enable_compile_cache()


@pytest.mark.slow
def test_one_and_two_processes_train_the_same_params(tiny_fashion_mnist, compile_cache, tmp_path):
  command = [sys.executable, "-m", "pvt_jax.main", "--config=configs/b0.py:runlocal",
             f"--config.fashion_mnist_dir={tiny_fashion_mnist}", *config_flags(AUGMENTED),
             f"--workdir={tmp_path / 'two_processes'}"]
  port = free_port()
  procs = [subprocess.Popen(command + [f"--coordinator_address=127.0.0.1:{port}",
                                       "--num_processes=2", f"--process_id={i}"],
                            cwd=REPO, env=subprocess_env(compile_cache), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  try:
    config = tiny_config(tiny_fashion_mnist, AUGMENTED)
    loop.train_and_evaluate(config, str(tmp_path / "one_process"))
    outputs = [proc.communicate(timeout=600) for proc in procs]
  finally:
    for proc in procs:
      proc.kill()
  for proc, (_, err) in zip(procs, outputs, strict=True):
    assert proc.returncode == 0, err[-3000:]
  losses, final_eval = history(tmp_path / "one_process")
  other_losses, other_eval = history(tmp_path / "two_processes")
  assert len(losses) == 3
  np.testing.assert_allclose(other_losses, losses, rtol=1e-5)
  assert other_eval["eval/loss"] == pytest.approx(final_eval["eval/loss"], rel=1e-4)
  params, _ = restore_params(str(tmp_path / "one_process"), config)
  other_params, _ = restore_params(str(tmp_path / "two_processes"), config)
  assert relative_error(params, other_params) <= 1e-5
