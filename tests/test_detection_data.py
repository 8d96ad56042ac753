"""Detection data: the Fashion-MNIST detection set, COCO-layout and tfds sources, bad input,
and the train/eval iterators' determinism, resumption, process split and padding."""

import json
import os

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from pvt_jax.configs import detection as detection_config
from pvt_jax.data import detection as data
from pvt_jax.data.detection import coco, pipeline, synthetic, transforms
from pvt_jax.data.errors import DatasetError


def _config(**overrides) -> ml_collections.ConfigDict:
  c = detection_config.get_config()
  c.synthetic.num_train, c.synthetic.num_val = 40, 12
  c.batch_size, c.eval_batch_size = 4, 4
  for key, value in overrides.items():
    c[key] = value
  return c


@pytest.fixture
def fashion_config(tiny_fashion_mnist):
  return _config(fashion_mnist_dir=tiny_fashion_mnist)


def test_synthetic_boxes_are_the_items_foreground(fashion_config):
  split = data.open_split(fashion_config, "train")
  s = fashion_config.synthetic
  again = synthetic.open_synthetic_split(fashion_config.fashion_mnist_dir, "train",
                                         synthetic.SyntheticSettings(
                                             s.image_size, 40, 12, s.max_items, tuple(s.item_size)))
  assert len(split) == 40 and split.num_classes == 10
  for k in range(len(split)):
    np.testing.assert_array_equal(split.boxes[k], again.boxes[k])  # deterministic
    image = np.asarray(split.reader.read(tf.constant(k, tf.int64)))[..., 0]
    assert image.shape == (s.image_size, s.image_size)
    inside = np.zeros_like(image, bool)
    for x1, y1, x2, y2 in split.boxes[k].astype(int):
      inside[y1:y2, x1:x2] = True
      box = image[y1:y2, x1:x2] > 0  # each edge of a box touches its foreground
      assert box[0].any() and box[-1].any() and box[:, 0].any() and box[:, -1].any()
    assert not (image[~inside] > 0).any()  # no foreground outside the boxes
  assert set(np.concatenate(split.labels)) <= set(range(10))
  val = data.open_split(fashion_config, "val")
  assert len(val) == 12 and len(val.ground_truth["annotations"]) == sum(map(len, val.boxes))


def test_coco_layout_round_trip_and_bad_input(fashion_config, tmp_path, caplog):
  """The synthetic val split exported in the COCO layout reads back identically; then broken
  annotations are dropped and counted, and missing files named."""
  val = data.open_split(fashion_config, "val")
  root = str(tmp_path / "coco")
  path = synthetic.export_coco_layout(val, root, "val2017")
  back = coco.open_coco_split(root, "val2017")
  assert back.category_ids == val.category_ids and back.class_names == val.class_names
  np.testing.assert_array_equal(back.image_ids, val.image_ids)
  for k in (0, 5):
    np.testing.assert_allclose(back.boxes[k], val.boxes[k])
    np.testing.assert_array_equal(back.reader.read(tf.constant(k, tf.int64)),
                                  val.reader.read(tf.constant(k, tf.int64)))

  with open(path) as f:
    truth = json.load(f)
  image = truth["images"][0]
  extra = [{"bbox": [2, 2, 0.5, 10], "category_id": 1, "area": 5},       # narrower than 1 px
           {"bbox": [500, 500, 10, 10], "category_id": 1, "area": 100},  # outside the image
           {"bbox": [2, 2, 10, 10], "category_id": 99, "area": 100},     # unknown category
           {"bbox": [2, 2, 10, 10], "category_id": 2, "area": 100, "iscrowd": 1},
           {"bbox": [image["width"] - 8, image["height"] - 8, 20, 20], "category_id": 3,
            "area": 400}]  # partly outside: kept
  for n, ann in enumerate(extra):
    truth["annotations"].append({"id": 10_000 + n, "image_id": image["id"], **ann})
  with open(path, "w") as f:
    json.dump(truth, f)
  with caplog.at_level("WARNING"):
    dirty = coco.open_coco_split(root, "val2017")
  assert len(dirty.boxes[0]) == len(val.boxes[0]) + 1
  w, h = image["width"], image["height"]
  np.testing.assert_allclose(dirty.boxes[0][-1], [w - 8, h - 8, w + 12, h + 12])
  message = caplog.text
  assert "1 crowd boxes" in message and "1 outside the image" in message
  assert "1 unknown category" in message and "1 narrower or shorter than 1 px" in message

  os.remove(os.path.join(root, "val2017", image["file_name"]))
  with pytest.raises(DatasetError, match=r"image file .*\.png is missing"):
    coco.open_coco_split(root, "val2017")
  with pytest.raises(DatasetError, match="no such annotation file"):
    coco.open_coco_split(root, "train2017")
  truth["annotations"][0].pop("area")
  with open(path, "w") as f:
    json.dump(truth, f)
  with pytest.raises(DatasetError, match="lacks area"):
    coco.open_coco_split(root, "val2017")
  with open(path, "w") as f:
    f.write("{not json")
  with pytest.raises(DatasetError, match="not a JSON file"):
    coco.open_coco_split(root, "val2017")
  with pytest.raises(DatasetError, match="unknown detection dataset"):
    data.open_split(_config(dataset="voc"), "train")


def _write_sized_dataset(root, sizes, split="train"):
  """A COCO-layout dataset of PNGs of the given (h, w) sizes, two boxes each."""
  os.makedirs(os.path.join(root, split), exist_ok=True)
  os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
  images, anns = [], []
  for k, (h, w) in enumerate(sizes, start=1):
    pixels = np.full((h, w, 3), k * 3 % 256, np.uint8)
    tf.io.write_file(os.path.join(root, split, f"{k}.png"), tf.io.encode_png(pixels))
    images.append({"id": k, "height": h, "width": w, "file_name": f"{k}.png"})
    for n, box in enumerate(([1, 2, w / 2, h / 3], [w / 4, h / 4, w / 2, h / 2])):
      anns.append({"id": 2 * k + n, "image_id": k, "category_id": 1 + n, "bbox": box,
                   "area": box[2] * box[3], "iscrowd": 0})
  with open(os.path.join(root, "annotations", f"instances_{split}.json"), "w") as f:
    json.dump({"images": images, "annotations": anns,
               "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}, f)


@pytest.fixture(scope="module")
def two_canvas_config(tmp_path_factory):
  """Landscape and portrait images of several sizes on canvases 48x64 and 64x48."""
  root = str(tmp_path_factory.mktemp("sized"))
  rng = np.random.default_rng(0)
  sizes = [(int(rng.integers(20, 50)), int(rng.integers(50, 90))) for _ in range(14)]
  sizes += [(w, h) for h, w in sizes[:9]]
  _write_sized_dataset(root, sizes, "train")
  c = _config(dataset=f"coco:{root}", train_split="train", eval_split="train",
              image_scale=(64, 48), canvas_sizes=((48, 64), (64, 48)), size_divisor=16,
              min_image_size=1, max_boxes=3)
  c.aug.multiscale_short = (40, 48)
  return c


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_train_iterator_is_deterministic_resumable_and_split_by_process(two_canvas_config):
  c = two_canvas_config
  info = data.dataset_info(c)
  canvases = np.array([0] * 14 + [1] * 9)
  assert info.steps_per_epoch == 14 // 4 + 9 // 4 == 5
  whole = _take(data.train_iterator(c, process_index=0, process_count=1), 12)  # > 2 epochs
  for batch in whole:
    assert batch["image"].shape[1:3] in ((48, 64), (64, 48))
    h, w = batch["image"].shape[1:3]
    assert (batch["image_size"] <= (h, w)).all() and (batch["image_size"].min(1) >= 1).all()
    sizes = batch["image_size"]
    for k in range(4):  # pixels past the resized image are zero padding
      image = batch["image"][k]
      assert not image[sizes[k, 0]:].any() and not image[:, sizes[k, 1]:].any()
    boxes = batch["boxes"][batch["box_mask"]]
    assert (boxes[:, 2:] > boxes[:, :2]).all()
    assert batch["box_mask"].sum(1).tolist() == [2] * 4
  resumed = _take(data.train_iterator(c, start_step=7, process_index=0, process_count=1), 5)
  for a, b in zip(whole[7:], resumed, strict=True):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  halves = [_take(data.train_iterator(c, process_index=p, process_count=2), 6) for p in (0, 1)]
  for step in range(6):
    for key in whole[step]:
      np.testing.assert_array_equal(
          np.concatenate([halves[0][step][key], halves[1][step][key]]), whole[step][key])
  # Each epoch shows every image at most once, batches of one canvas each.
  schedule = data.epoch_schedule(canvases, 4, seed=0, epoch=3)
  assert schedule.shape == (5, 4) and len(set(schedule.ravel())) == 20
  assert all(len(set(canvases[row])) == 1 for row in schedule)


def test_eval_iterator_counts_each_image_once_on_any_process_count(two_canvas_config):
  c = two_canvas_config
  split = data.open_split(c, c.eval_split)
  for count in (1, 2):
    per_process = [list(data.eval_iterator(c, process_index=p, process_count=count))
                   for p in range(count)]
    assert len({len(batches) for batches in per_process}) == 1
    ids = np.concatenate([b["image_id"][b["mask"]] for batches in per_process for b in batches])
    assert sorted(ids.tolist()) == sorted(split.image_ids.tolist())
    for batches in per_process:
      for b in batches:
        assert not b["image"][~b["mask"]].any()
        k = np.searchsorted(split.image_ids, b["image_id"][b["mask"]])
        want = b["image_size"][b["mask"]][:, ::-1] / split.sizes[k][:, ::-1]
        np.testing.assert_allclose(b["scale_factor"][b["mask"]], want, rtol=1e-6)


@pytest.mark.torch
def test_resize_and_flip_match_mmdet():
  """Sizes, scale factors and boxes of mmdet's Resize (keep ratio) + RandomFlip equal; pixels
  differ by at most one grey level (random noise images: the worst case for rounding)."""
  pytest.importorskip("torch")
  from test_detection_mmdet import _mmdet
  _mmdet()
  from mmdet.datasets.transforms import RandomFlip, Resize
  rng = np.random.default_rng(1)
  for h, w in [(480, 640), (427, 640), (640, 359), (200, 3000), (1024, 1024)]:
    image = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
    boxes = np.array([[10, 20, w * 0.7, h * 0.9], [w * 0.5, 0, w + 5, h * 0.4]], np.float32)
    short = int(rng.integers(640, 801))
    results = Resize(scale=(1333, short), keep_ratio=True)(
        {"img": image, "img_shape": (h, w), "gt_bboxes": boxes.copy()})
    results = RandomFlip(prob=1.0)(results)
    new = transforms.resized_sizes(np.array([[h, w]]), 1333, short)[0]
    assert tuple(new) == results["img_shape"]
    np.testing.assert_allclose(new[::-1] / np.array([w, h]), results["scale_factor"])
    np.testing.assert_allclose(transforms.transform_boxes(boxes, np.array([h, w]), new, True),
                               results["gt_bboxes"], rtol=1e-6, atol=1e-4)
    ours = transforms.prepare_image(image, new, tf.constant(True), new).numpy()
    ours = ours * np.array(transforms.STD) + np.array(transforms.MEAN)
    difference = np.abs(ours - results["img"])
    # cv2 interpolates uint8 with 11-bit fixed-point weights: off by one level near x.5.
    assert difference.max() < 1.001 and (difference > 0.5).mean() < 0.2


class CocoFake(tfds.core.GeneratorBasedBuilder):
  """A tiny dataset with coco/2017's features (JPEG images, normalised boxes, COCO labels)."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    names = [n for _, n in coco.COCO_CATEGORIES]
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(encoding_format="jpeg"),
        "image/filename": tfds.features.Text(),
        "image/id": np.int64,
        "objects": tfds.features.Sequence({
            "area": np.int64, "bbox": tfds.features.BBoxFeature(), "id": np.int64,
            "is_crowd": np.bool_, "label": tfds.features.ClassLabel(names=names)}),
    }))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"validation": self._generate_examples()}

  def _generate_examples(self):
    rng = np.random.default_rng(0)
    for k, (h, w) in enumerate([(40, 60), (64, 32), (50, 50)]):
      yield k, {"image": rng.integers(0, 255, (h, w, 3), dtype=np.uint8),
                "image/filename": f"{k}.jpg", "image/id": 100 + k,
                "objects": {"area": [120, 30], "id": [2 * k, 2 * k + 1],
                            "bbox": [tfds.features.BBox(0.1, 0.2, 0.5, 0.6),
                                     tfds.features.BBox(0.0, 0.0, 0.2, 0.3)],
                            "is_crowd": [False, k == 1], "label": [0, 79]}}


def test_tfds_source_reads_coco_features(tmp_path):
  data_dir = str(tmp_path / "tfds")
  CocoFake(data_dir=data_dir, file_format="array_record").download_and_prepare()
  c = _config(dataset="tfds:coco_fake", data_dir=data_dir, eval_split="validation",
              image_scale=(64, 64), canvas_sizes=((64, 64),))
  for _ in range(2):  # the second open reads the cached index
    pipeline._open.cache_clear()
    split = data.open_split(c, "validation")
    assert split.category_ids[0] == 1 and split.category_ids[79] == 90
    k = {int(i): n for n, i in enumerate(split.image_ids)}  # tfds orders records by key hash
    assert sorted(k) == [100, 101, 102]
    np.testing.assert_array_equal(split.sizes[[k[100], k[101], k[102]]],
                                  [[40, 60], [64, 32], [50, 50]])
    np.testing.assert_allclose(split.boxes[k[100]], [[12, 4, 36, 20], [0, 0, 18, 8]], atol=1e-4)
    assert split.labels[k[101]].tolist() == [0]  # its crowd box is not a training box
    crowd = {a["image_id"]: [] for a in split.ground_truth["annotations"]}
    for a in split.ground_truth["annotations"]:
      crowd[a["image_id"]].append(a["iscrowd"])
    assert crowd == {100: [0, 0], 101: [0, 1], 102: [0, 0]}
  assert os.listdir(os.path.join(data_dir, "coco_fake", "1.0.0", "pvt_jax_index"))
  batches = list(data.eval_iterator(c))
  assert sum(int(b["mask"].sum()) for b in batches) == 3
  with pytest.raises(DatasetError, match="not prepared|cannot be read"):
    data.open_split(_config(dataset="tfds:coco_fake", data_dir=str(tmp_path / "none")), "train")
