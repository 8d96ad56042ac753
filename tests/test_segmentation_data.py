"""Segmentation input pipelines: mmcv/cv2 geometry, the official transforms, every source (ADE20K
layout, folder, tfds scene_parse150 prepared offline, the Fashion-MNIST canvases), resume
exactness, per-process disjointness and exact eval buckets, and one-line errors."""

import os

import cv2
import mmcv
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from configs import sem_fpn
from pvt_jax.data import DatasetError
from pvt_jax.data import segmentation as seg
from pvt_jax.data.segmentation import synthetic, transforms


def config(dataset="fashion_mnist_seg", **overrides):
  c = sem_fpn.get_config("b0,runlocal")
  c.dataset = dataset
  c.seg.synthetic.num_train, c.seg.synthetic.num_eval = 24, 10
  for key, value in overrides.items():
    node = c
    *path, leaf = key.split(".")
    for name in path:
      node = node[name]
    node[leaf] = value
  return c


@pytest.fixture(autouse=True)
def _fashion_dir(tiny_fashion_mnist, monkeypatch):
  """Every config below reads the tiny generated idx files."""
  original = sem_fpn.get_config

  def with_tiny_files(arg=None):
    c = original(arg)
    c.fashion_mnist_dir = tiny_fashion_mnist
    return c

  monkeypatch.setattr(sem_fpn, "get_config", with_tiny_files)


def write_folder(root, split_sizes, *, classes=5, seed=0, image_format="JPEG"):
  """root/images/<split>/<i>.jpg + root/annotations/<split>/<i>.png, sizes per split."""
  rng = np.random.default_rng(seed)
  for split, sizes in split_sizes.items():
    os.makedirs(root / "images" / split, exist_ok=True)
    os.makedirs(root / "annotations" / split, exist_ok=True)
    for i, (h, w) in enumerate(sizes):
      image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
      label = rng.integers(0, classes + 1, (h, w), dtype=np.uint8)
      suffix = ".jpg" if image_format == "JPEG" else ".png"
      Image.fromarray(image).save(root / "images" / split / f"img{i:03d}{suffix}", image_format)
      Image.fromarray(label).save(root / "annotations" / split / f"img{i:03d}.png")
  return root


# --- mmcv / cv2 geometry ----------------------------------------------------------------------

@pytest.mark.parametrize("hw", [(375, 500), (512, 683), (1000, 250), (300, 301)])
def test_rescale_sizes_equal_mmcv(hw):
  for scale in ((2048, 512), (1024, 256)):
    rescaled, aligned = transforms.eval_sizes(np.array([hw[0]]), np.array([hw[1]]), scale, 32)
    w, h = mmcv.rescale_size((hw[1], hw[0]), scale)
    assert tuple(rescaled[0]) == (h, w)
    assert tuple(aligned[0]) == (-(-h // 32) * 32, -(-w // 32) * 32)


def test_label_resize_is_cv2_nearest_and_image_resize_cv2_linear():
  rng = np.random.default_rng(0)
  label = rng.integers(0, 150, (37, 53)).astype(np.int32)
  image = rng.integers(0, 256, (37, 53, 3)).astype(np.uint8)
  for h, w in ((80, 111), (20, 17), (37, 106)):
    ours = transforms.resize_label(tf.constant(label), h, w).numpy()
    np.testing.assert_array_equal(ours, cv2.resize(label.astype(np.uint8), (w, h),
                                                   interpolation=cv2.INTER_NEAREST))
    resized = transforms.resize_image(tf.constant(image, tf.float32), h, w).numpy()
    reference = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    assert np.abs(resized - reference).max() <= 1  # cv2 computes in 11-bit fixed point


def test_reduce_zero_label():
  label = tf.constant([0, 1, 2, 150, 255])
  np.testing.assert_array_equal(transforms.reduce_zero_label(label).numpy(),
                                [255, 0, 1, 149, 255])


def test_random_crop_enforces_cat_max_ratio():
  """Left half all class 1, right half mixed: about half the windows pass 0.75, so within 10
  tries one does (all fail with probability ~3e-4 per crop)."""
  label = np.ones((32, 400), np.int32)
  label[:, 200:] = np.arange(200) % 3 + 2
  image = tf.zeros((32, 400, 3))
  offsets = {1.0: [], 0.75: []}
  for ratio in offsets:
    for k in range(40):
      _, crop = transforms.random_crop(tf.constant([k, 1], tf.int64), image, tf.constant(label),
                                       (32, 64), ratio)
      crop = crop.numpy()
      counts = np.bincount(crop.ravel())
      offsets[ratio].append(counts.max() / counts.sum())
  assert max(offsets[0.75]) < 0.75  # a passing window exists within 10 tries here
  assert np.mean(np.array(offsets[1.0]) == 1.0) > 0.3  # unchecked: many pure class-1 windows


def test_photometric_distortion_is_deterministic_uint8_and_varies():
  image = tf.constant(np.random.default_rng(0).integers(0, 256, (16, 16, 3)), tf.float32)
  outputs = [transforms.photometric_distortion(tf.constant([s, 0], tf.int64), image).numpy()
             for s in range(12)]
  again = transforms.photometric_distortion(tf.constant([3, 0], tf.int64), image).numpy()
  np.testing.assert_array_equal(outputs[3], again)
  for out in outputs:
    assert out.min() >= 0 and out.max() <= 255 and (out == np.round(out)).all()
  assert len({out.tobytes() for out in outputs}) > 6


# --- the Fashion-MNIST canvases ---------------------------------------------------------------

def test_fashion_mnist_canvases(tiny_fashion_mnist):
  images, labels = synthetic.build(tiny_fashion_mnist, "train", 20, 64, 0)
  again = synthetic.build.__wrapped__(tiny_fashion_mnist, "train", 20, 64, 0)
  np.testing.assert_array_equal(images, again[0])
  assert images.shape == (20, 64, 64, 3) and labels.shape == (20, 64, 64)
  assert set(np.unique(labels)) <= set(range(11)) and len(np.unique(labels)) > 5
  foreground = labels > 0
  assert 0.05 < foreground.mean() < 0.7
  assert (images[..., 0][foreground] >= synthetic.FOREGROUND_THRESHOLD).all()
  validation, _ = synthetic.build(tiny_fashion_mnist, "validation", 20, 64, 0)
  assert not np.array_equal(validation, images)  # items from the test split, other draws
  info = seg.dataset_info(config())
  assert (info.num_classes, info.class_names[0], info.num_train_examples) == (11, "background",
                                                                              24)


# --- train stream -----------------------------------------------------------------------------

def test_train_batches_are_deterministic_and_resume_exactly():
  c = config(batch_size=4)  # 24 examples: 6 steps per epoch
  stream = seg.train_iterator(c)
  batches = [next(stream) for _ in range(9)]
  assert batches[0]["image"].shape == (4, 64, 64, 3) and batches[0]["label"].dtype == np.int32
  resumed = seg.train_iterator(c, start_step=4)
  for expected in batches[4:]:
    got = next(resumed)
    np.testing.assert_array_equal(got["image"], expected["image"])
    np.testing.assert_array_equal(got["label"], expected["label"])
  assert not np.array_equal(batches[0]["image"], batches[6]["image"])  # a new epoch's order


def test_train_processes_read_disjoint_examples():
  """Without augmentation, each process's epoch is a permutation of its own shard."""
  c = config(batch_size=4, **{"seg.ratio_range": (1.0, 1.0), "seg.flip_probability": 0.0,
                              "seg.photometric": False})
  images, _ = synthetic.build(c.fashion_mnist_dir, "train", 24, 64, 0)
  index_of = {image.tobytes(): i for i, image in enumerate(images)}
  seen = []
  for process in range(2):
    stream = seg.train_iterator(c, process_index=process, process_count=2)
    batches = [next(stream) for _ in range(6)]  # one epoch: 6 steps of 2 per process
    normalised = np.concatenate([b["image"] for b in batches])
    raw = np.round(normalised * np.array([58.395, 57.12, 57.375])
                   + np.array([123.675, 116.28, 103.53])).astype(np.uint8)
    seen.append(sorted(index_of[r.tobytes()] for r in raw))
  assert seen[0] == list(range(0, 24, 2)) and seen[1] == list(range(1, 24, 2))


# --- eval buckets -----------------------------------------------------------------------------

SIZES = [(40, 60), (60, 40), (41, 61), (100, 30), (64, 64), (40, 60), (50, 75)]


def collect(c, process_count=1):
  """All eval batches of every process, and the (canvas, image_size, label) of each real one."""
  examples = []
  for process in range(process_count):
    for batch in seg.eval_iterator(c, process_index=process, process_count=process_count):
      for i in np.flatnonzero(batch["mask"]):
        lh, lw = batch["label_size"][i]
        examples.append((batch["image"].shape[1:3], tuple(batch["image_size"][i]),
                         batch["label"][i][:lh, :lw].tobytes()))
  return sorted(examples)


def test_eval_buckets_shapes_and_exactness_over_processes(tmp_path):
  root = write_folder(tmp_path / "data", {"train": SIZES[:2], "val": SIZES}, classes=4)
  c = config(f"folder:{root}", num_classes=4, eval_batch_size=2, eval_split="val", **{
      "seg.eval_scale": (128, 64), "seg.eval_label_canvas_multiple": 32,
      "seg.reduce_zero_label": True})
  sizes, rescaled, aligned, buckets = seg.eval_plan(c)
  np.testing.assert_array_equal(sizes, SIZES)
  # Fitted into (128, 64) keeping the ratio (mmcv), then rounded up to multiples of 32.
  assert tuple(aligned[0]) == (64, 96) and tuple(aligned[3]) == (128, 64)
  batches = list(seg.eval_iterator(c))
  assert sum(len(b.examples) for b in buckets) == len(SIZES)
  assert len(batches) == sum(b.num_batches(2, 1) for b in buckets)
  for batch in batches:
    h, w = batch["image"].shape[1:3]
    for i in np.flatnonzero(batch["mask"]):
      ih, iw = batch["image_size"][i]
      assert (ih, iw) <= (h, w) and not batch["image"][i, ih:].any()
      lh, lw = batch["label_size"][i]
      assert (batch["label"][i, lh:] == 255).all() and (batch["label"][i, :, lw:] == 255).all()
  # reduce_zero_label: PNG value 0 -> 255, k -> k - 1.
  first = np.asarray(Image.open(root / "annotations" / "val" / "img000.png")).astype(int)
  found = [b["label"][i][:40, :60] for b in batches for i in np.flatnonzero(b["mask"])
           if tuple(b["label_size"][i]) == (40, 60)]
  assert len(found) == 2
  assert any(np.array_equal(f, np.where(first == 0, 255, first - 1)) for f in found)
  c.eval_batch_size = 6  # a multiple of every process count below
  assert collect(c, process_count=2) == collect(c) == collect(c, process_count=3)


def test_eval_image_is_alignresize_of_the_file(tmp_path):
  root = write_folder(tmp_path / "data", {"val": [(40, 60)]}, image_format="PNG")
  c = config(f"folder:{root}", num_classes=5, eval_split="val", **{"seg.eval_scale": (96, 48)})
  batch = next(seg.eval_iterator(c))
  image = np.asarray(Image.open(root / "images" / "val" / "img000.png"))
  rescaled = cv2.resize(image, (72, 48), interpolation=cv2.INTER_LINEAR)  # mmcv imrescale
  aligned = cv2.resize(rescaled, (96, 64), interpolation=cv2.INTER_LINEAR)  # AlignResize
  normalised = (aligned - np.array([123.675, 116.28, 103.53])) / np.array([58.395, 57.12, 57.375])
  assert tuple(batch["image_size"][0]) == (64, 96)
  assert np.abs(batch["image"][0, :64, :96] - normalised).max() < 2.5 / 57  # <= 2 grey levels


def test_ade20k_layout(tmp_path):
  root = tmp_path / "ADEChallengeData2016"
  write_folder(root, {"training": SIZES[:3], "validation": SIZES[:2]}, classes=150)
  c = config(f"ade20k:{root}", train_split="training", eval_split="validation")
  info = seg.dataset_info(c)
  assert (info.num_classes, info.class_names[0], info.class_names[-1]) == (150, "wall", "flag")
  assert (info.num_train_examples, info.num_eval_examples) == (3, 2)
  batch = next(seg.train_iterator(config(f"ade20k:{root}", train_split="training",
                                         batch_size=2, **{"seg.crop_size": (32, 32)})))
  assert batch["image"].shape == (2, 32, 32, 3) and batch["label"].max() <= 255


def test_scene_parse150_from_a_prepared_tfds_builder(tmp_path, monkeypatch):
  """tfds' real builder, prepared offline from generated files in its release layout (its
  download manager is pointed at them); labels are the annotation's first (R) channel."""
  import tensorflow_datasets as tfds

  fake = tmp_path / "downloads"
  for split, count in (("training", 3), ("validation", 2)):
    os.makedirs(fake / "images" / split)
    os.makedirs(fake / "annotations_instance" / split)
    for i in range(count):
      Image.fromarray(np.full((24, 36, 3), 9 * i, np.uint8)).save(
          fake / "images" / split / f"ADE_{i}.jpg")
      annotation = np.zeros((24, 36, 3), np.uint8)
      annotation[..., 0], annotation[..., 1] = i + 1, 7  # R: category, G: instance
      Image.fromarray(annotation).save(fake / "annotations_instance" / split / f"ADE_{i}.png")
  monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract",
                      lambda self, urls: {name: str(fake) for name in urls})
  data_dir = str(tmp_path / "tfds")
  tfds.builder("scene_parse150", data_dir=data_dir).download_and_prepare()
  c = config("scene_parse150", data_dir=data_dir, train_split="train", eval_split="test",
             eval_batch_size=2, **{"seg.eval_scale": (36, 24)})
  info = seg.dataset_info(c)
  assert (info.num_classes, info.num_train_examples, info.num_eval_examples) == (100, 3, 2)
  labels = sorted(int(np.unique(b["label"][i][:24, :36])[0])
                  for b in seg.eval_iterator(c) for i in np.flatnonzero(b["mask"]))
  assert labels == [0, 1]  # R channel 1, 2 with the zero label reduced


# --- errors -----------------------------------------------------------------------------------

def test_corrupt_image_and_mismatched_label_name_the_file(tmp_path):
  root = write_folder(tmp_path / "bad", {"train": [(40, 60)] * 4, "val": [(40, 60)] * 2})
  (root / "images" / "train" / "img002.jpg").write_bytes(b"not an image at all")
  c = config(f"folder:{root}", num_classes=5, batch_size=4, eval_split="val")
  with pytest.raises(DatasetError, match=r"corrupt image file .*img002\.jpg"):
    next(seg.train_iterator(c))
  Image.fromarray(np.zeros((40, 61), np.uint8)).save(root / "annotations" / "val" / "img001.png")
  with pytest.raises(DatasetError, match=r"label of .*img001\.jpg is 61x40, its image 60x40"):
    list(seg.eval_iterator(c))
  os.replace(root / "annotations" / "val" / "img001.png",
             root / "annotations" / "train" / "img002.png")  # the corrupt image's slot
  (root / "images" / "train" / "img002.jpg").unlink()
  Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(root / "images" / "train" / "img002.jpg")
  Image.fromarray(np.zeros((40, 61), np.uint8)).save(root / "annotations" / "train" / "img002.png")
  with pytest.raises(DatasetError, match=r"label size differs from its image .*img002\.jpg"):
    next(seg.train_iterator(c))


def test_missing_annotation_and_unknown_dataset(tmp_path):
  root = write_folder(tmp_path / "gap", {"train": [(20, 20)] * 2})
  (root / "annotations" / "train" / "img001.png").unlink()
  with pytest.raises(DatasetError, match=r"no annotation for .*img001\.jpg"):
    seg.dataset_info(config(f"folder:{root}", num_classes=3))
  with pytest.raises(DatasetError, match="set config.num_classes"):
    seg.dataset_info(config(f"folder:{root}", num_classes=0))
  with pytest.raises(DatasetError, match="unknown segmentation dataset 'cityscapes'"):
    seg.dataset_info(config("cityscapes"))
