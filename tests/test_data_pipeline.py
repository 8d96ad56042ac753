"""Input pipeline behaviour: determinism, exact resume, per-process shards, repeated
augmentation and exactly-once eval with padding (processes simulated via explicit kwargs)."""

import itertools
import math
import shutil

import numpy as np
import pytest
import tensorflow as tf
from conftest import write_fashion_mnist
from test_data_sources import make_config

from pvt_jax import data
from pvt_jax.data import augment, pipeline

NO_AUG = {"random_resized_crop": False, "hflip": False, "randaugment": "", "random_erasing": 0.0,
          "mixup_alpha": 0.0, "cutmix_alpha": 0.0, "mixup_prob": 0.0, "label_smoothing": 0.0,
          "repeated_aug": 1}


def fashion_config(directory, data_dir, **overrides):
  config = make_config(fashion_mnist_dir=directory, data_dir=data_dir, batch_size=16)
  aug = overrides.pop("aug", {})
  config.update(overrides)
  config.aug.update(aug)
  return config


def take(config, n, start_step=0, **kwargs):
  return list(itertools.islice(data.train_iterator(config, start_step, **kwargs), n))


def pixel_keys(images):
  """Identity of each (unaugmented, 28 px) uint8 image: its grey pixels as bytes."""
  return [g.tobytes() for g in images[..., 0]]


def test_train_batches_shapes_and_seed(tiny_fashion_mnist, tfds_data_dir):
  # RandAugment's determinism is covered by the resume test (its graph is slow to build).
  config = fashion_config(tiny_fashion_mnist, tfds_data_dir, aug={"randaugment": ""})
  first = take(config, 2)
  again = take(config, 2)
  # uint8 images and integer labels: normalisation, erasing and mixup run in the train step.
  assert first[0]["image"].shape == (16, 32, 32, 3) and first[0]["label"].shape == (16,)
  assert first[0]["image"].dtype == np.uint8 and first[0]["label"].dtype == np.int32
  for a, b in zip(first, again, strict=True):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  config.seed = 1
  other = take(config, 1)
  assert not np.array_equal(first[0]["image"], other[0]["image"])


@pytest.mark.parametrize("cache,randaugment", [(False, "rand-m9-mstd0.5-inc1"), (True, "")])
def test_resume_equals_uninterrupted_stream(tiny_fashion_mnist, tfds_data_dir, cache,
                                            randaugment):
  # Full recipe with repeated augmentation; 200 // 16 = 12 steps per epoch, so steps 13-14
  # are in the second epoch.
  config = fashion_config(tiny_fashion_mnist, tfds_data_dir, cache=cache,
                          aug={"repeated_aug": 3, "randaugment": randaugment})
  stream = take(config, 15)
  for start in (5, 13):
    resumed = take(config, 2, start_step=start)
    for a, b in zip(stream[start:start + 2], resumed, strict=True):
      np.testing.assert_array_equal(a["image"], b["image"])
      np.testing.assert_array_equal(a["label"], b["label"])
  assert not np.array_equal(stream[0]["image"], stream[12]["image"])  # epochs differ


def test_train_shards_are_disjoint_and_cover(tiny_fashion_mnist, tfds_data_dir):
  # Two processes, global batch 20: 10 steps per epoch of 10 local examples = each shard once.
  config = fashion_config(tiny_fashion_mnist, tfds_data_dir, batch_size=20, image_size=28,
                          aug=NO_AUG)
  seen = []
  for index in range(2):
    batches = take(config, 10, process_index=index, process_count=2)
    assert all(b["image"].shape[0] == 10 for b in batches)
    seen.append(pixel_keys(np.concatenate([b["image"] for b in batches])))
  assert len(set(seen[0])) == len(seen[0]) == 100 and len(set(seen[1])) == 100
  assert not set(seen[0]) & set(seen[1])
  eval_config = fashion_config(tiny_fashion_mnist, tfds_data_dir, image_size=28, eval_split="train",
                               eval_batch_size=200)
  everything = next(data.eval_iterator(eval_config))["image"]
  assert set(seen[0]) | set(seen[1]) == set(pixel_keys(everything))


def test_repeated_augmentation_semantics(tiny_fashion_mnist, tfds_data_dir):
  # x3: each epoch shows a third of the records three times in a row (flips differ), 12 steps.
  config = fashion_config(tiny_fashion_mnist, tfds_data_dir, image_size=28,
                          aug={**NO_AUG, "hflip": True, "repeated_aug": 3})
  epoch = np.concatenate([b["image"] for b in take(config, 12)])
  assert len(epoch) == 192
  unflipped = [min(k, f) for k, f in zip(pixel_keys(epoch), pixel_keys(epoch[:, :, ::-1]),
                                          strict=True)]
  groups = [unflipped[i:i + 3] for i in range(0, 192, 3)]
  assert all(len(set(g)) == 1 for g in groups)
  assert len({g[0] for g in groups}) == 64
  exact = pixel_keys(epoch)
  assert sum(len(set(exact[i:i + 3])) > 1 for i in range(0, 192, 3)) > 32  # flips differ


@pytest.fixture(scope="module")
def uneven_fashion_mnist(tmp_path_factory):
  return write_fashion_mnist(str(tmp_path_factory.mktemp("uneven")), 40, 51, seed=3)


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_counts_every_example_once(uneven_fashion_mnist, tfds_data_dir, process_count):
  config = fashion_config(uneven_fashion_mnist, tfds_data_dir, image_size=28, eval_batch_size=8)
  reference = pixel_keys(next(data.eval_iterator(
      fashion_config(uneven_fashion_mnist, tfds_data_dir, image_size=28, eval_batch_size=64)))[
          "image"][:51])
  keys, batch_counts = [], []
  for index in range(process_count):
    batches = list(data.eval_iterator(config, process_index=index, process_count=process_count))
    batch_counts.append(len(batches))
    for b in batches:
      assert b["image"].shape == (8 // process_count, 28, 28, 3)
      assert b["label"].dtype == np.int32 and b["mask"].dtype == bool
      keys += [k for k, m in zip(pixel_keys(b["image"]), b["mask"], strict=True) if m]
  # ceil(ceil(51 / P) / (8 / P)) batches on every process; 51 real examples in all.
  expected_batches = math.ceil(math.ceil(51 / process_count) / (8 // process_count))
  assert batch_counts == [expected_batches] * process_count
  assert sorted(keys) == sorted(reference) and len(keys) == 51


def test_eval_padding_is_masked(uneven_fashion_mnist, tfds_data_dir):
  config = fashion_config(uneven_fashion_mnist, tfds_data_dir, eval_batch_size=16)
  batches = list(data.eval_iterator(config))
  masks = np.concatenate([b["mask"] for b in batches])
  assert len(masks) == 64 and masks.sum() == 51 and not masks[51:].any()


def test_batch_size_must_split_over_processes(tiny_fashion_mnist, tfds_data_dir):
  config = fashion_config(tiny_fashion_mnist, tfds_data_dir, batch_size=15)
  with pytest.raises(data.DatasetError, match="multiple of the process count 2"):
    next(data.train_iterator(config, process_index=0, process_count=2))


def test_measure_throughput(tiny_fashion_mnist, tfds_data_dir):
  config = fashion_config(tiny_fashion_mnist, tfds_data_dir, cache=True)
  assert data.measure_throughput(config, num_batches=3, warmup_batches=1) > 0


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_crop_while_decoding_equals_crop_after(fmt):
  pixels = np.random.default_rng(0).integers(0, 256, (45, 61, 3), dtype=np.uint8)
  encode = tf.io.encode_jpeg if fmt == "jpeg" else tf.io.encode_png
  record = {"image": encode(pixels), "name": tf.constant("x")}
  source = type("Encoded", (), {"encoded": True})()
  seed = tf.constant([3, 4])
  box = lambda h, w: augment.random_resized_crop_box(seed, h, w)  # noqa: E731
  fused = pipeline._decode(record, source, box)
  top, left, h, w = box(45, 61)
  full = pipeline._decode(record, source)[top:top + h, left:left + w].numpy()
  fused = fused.numpy()
  assert fused.shape == full.shape
  # Identical except the JPEG window's last column, where libjpeg's chroma upsampling lacks the
  # right-hand neighbour.
  np.testing.assert_array_equal(fused[:, :-1], full[:, :-1])
  assert np.abs(fused[:, -1] - full[:, -1]).mean() < 8


@pytest.mark.parametrize("cache", [False, True])
def test_sliced_splits_train_resume_and_eval(tiny_fashion_mnist, tfds_data_dir, cache):
  # train[:48] over two processes: 24 records each, 16 // 2 = 8 per local batch, 3 steps/epoch.
  config = fashion_config(tiny_fashion_mnist, tfds_data_dir, image_size=28, cache=cache,
                          train_split="train[:48]", eval_split="train[:48]", eval_batch_size=48,
                          aug=NO_AUG)
  assert data.dataset_info(config).num_train_examples == 48
  allowed = set(pixel_keys(next(data.eval_iterator(config))["image"]))
  assert len(allowed) == 48
  seen = []
  for index in range(2):
    stream = take(config, 4, process_index=index, process_count=2)
    resumed = take(config, 2, start_step=2, process_index=index, process_count=2)
    for a, b in zip(stream[2:], resumed, strict=True):
      np.testing.assert_array_equal(a["image"], b["image"])
    seen.append(set(pixel_keys(np.concatenate([b["image"] for b in stream[:3]]))))
    evals = list(data.eval_iterator(config, process_index=index, process_count=2))
    assert sum(int(b["mask"].sum()) for b in evals) == 24
  assert len(seen[0]) == len(seen[1]) == 24 and not seen[0] & seen[1]
  assert seen[0] | seen[1] == allowed


def test_cache_is_filled_before_the_first_batch(tmp_path):
  # A cached run that stops early must not leave a partial cache (tf.data would discard it, warn
  # and read the files again): with the prepared files gone after the first batch, later epochs
  # still come from memory. train[:40], batch 16, buffer 4: one epoch reads only 36 records.
  directory = write_fashion_mnist(str(tmp_path / "fm"), 60, 10, seed=5)
  data_dir = str(tmp_path / "tfds")
  config = fashion_config(directory, data_dir, image_size=28, cache=True, shuffle_buffer=4,
                          train_split="train[:40]", aug=NO_AUG)
  batches = data.train_iterator(config)
  first = next(batches)
  shutil.rmtree(data_dir)
  later = [next(batches) for _ in range(5)]  # epochs 1-3 (2 steps each)
  keys = set(pixel_keys(np.concatenate([first["image"]] + [b["image"] for b in later])))
  assert len(keys) > 32
