"""Dataset sources: local Fashion-MNIST builder, stock imagenet2012 from tiny tars, tfds mock
data, ImageFolder, and the one-line errors for bad input. Everything offline, in tmp dirs."""

import io
import os
import subprocess
import sys
import tarfile

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import make_fashion_images, write_fashion_mnist, write_idx
from PIL import Image

from pvt_jax import data
from pvt_jax.data import fashion_mnist


def make_config(**overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict({
      "dataset": "fashion_mnist", "data_dir": None, "manual_dir": None,
      "fashion_mnist_dir": "/nonexistent", "train_split": "train", "eval_split": "",
      "image_size": 32, "crop_pct": 1.0, "batch_size": 4, "eval_batch_size": 0, "seed": 0,
      "shuffle_buffer": 100, "cache": False, "num_classes": 0,
      "aug": {"random_resized_crop": True, "crop_scale": (0.08, 1.0),
              "crop_ratio": (0.75, 4 / 3), "hflip": True, "randaugment": "rand-m9-mstd0.5-inc1",
              "random_erasing": 0.25, "mixup_alpha": 0.8, "cutmix_alpha": 1.0,
              "mixup_prob": 1.0, "mixup_switch_prob": 0.5, "label_smoothing": 0.1,
              "repeated_aug": 1}})
  config.update(overrides)
  return config


def all_eval(config):
  batches = list(data.eval_iterator(config))
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


# Fashion-MNIST (local idx files).

def test_fashion_mnist_reads_generated_idx_files(tiny_fashion_mnist, tfds_data_dir):
  config = make_config(fashion_mnist_dir=tiny_fashion_mnist, data_dir=tfds_data_dir,
                       eval_batch_size=10)
  info = data.dataset_info(config)
  assert (info.num_classes, info.num_train_examples, info.num_eval_examples) == (10, 200, 50)
  assert info.eval_split == "test"
  # Eval at 28 px and crop 1.0 is the identity resize: the pixels are the idx pixels, grey
  # replicated into RGB, as uint8 (the eval step normalises them).
  config.image_size = 28
  batch = all_eval(config)
  images, labels = fashion_mnist.read_split(tiny_fashion_mnist, "test")
  np.testing.assert_array_equal(batch["image"], np.repeat(images[..., None], 3, -1))
  np.testing.assert_array_equal(batch["label"], labels)


def test_fashion_mnist_plain_idx_files(tmp_path, tfds_data_dir):
  directory = write_fashion_mnist(str(tmp_path / "plain"), 30, 20, gz=False, seed=5)
  info = data.dataset_info(make_config(fashion_mnist_dir=directory, data_dir=tfds_data_dir))
  assert (info.num_train_examples, info.num_eval_examples) == (30, 20)


def test_fashion_mnist_missing_files_fail_fast(tmp_path):
  os.makedirs(tmp_path / "partial")
  write_idx(str(tmp_path / "partial" / "train-images-idx3-ubyte.gz"),
            make_fashion_images(np.zeros(3, int), 0))
  with pytest.raises(data.DatasetError) as e:
    data.dataset_info(make_config(fashion_mnist_dir=str(tmp_path / "partial")))
  message = str(e.value)
  assert "\n" not in message and "apt-get install dataset-fashion-mnist" in message
  assert "train-labels-idx1-ubyte" in message and "t10k-images-idx3-ubyte" in message
  assert "train-images-idx3-ubyte," not in message  # present files are not listed


def test_fashion_mnist_malformed_idx_file(tmp_path, tfds_data_dir):
  directory = write_fashion_mnist(str(tmp_path / "bad"), 10, 10, seed=9)
  with open(os.path.join(directory, "t10k-labels-idx1-ubyte.gz"), "wb") as f:
    f.write(b"not gzip at all")
  os.remove(os.path.join(directory, "t10k-labels-idx1-ubyte.gz"))
  with open(os.path.join(directory, "t10k-labels-idx1-ubyte"), "wb") as f:
    f.write(b"\x00\x00\x08\x03garbage")
  with pytest.raises(data.DatasetError, match="t10k-labels-idx1-ubyte is not an idx file"):
    data.dataset_info(make_config(fashion_mnist_dir=directory, data_dir=tfds_data_dir))


# imagenet2012: the stock tfds builder, prepared from tiny ILSVRC-style tars.

SYNSETS = ("n01440764", "n01443537", "n01484850")


def _jpeg(seed: int, size=(36, 48)) -> bytes:
  pixels = np.random.default_rng(seed).integers(0, 256, size + (3,), dtype=np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, "JPEG")
  return buffer.getvalue()


def _add(tar, name: str, payload: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(payload)
  tar.addfile(info, io.BytesIO(payload))


@pytest.fixture(scope="module")
def imagenet_manual_dir(tmp_path_factory):
  manual = tmp_path_factory.mktemp("imagenet_manual")
  with tarfile.open(manual / "ILSVRC2012_img_train.tar", "w") as train:
    for k, synset in enumerate(SYNSETS):
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode="w") as per_class:
        for i in range(2):
          _add(per_class, f"{synset}_{i}.JPEG", _jpeg(10 * k + i))
      _add(train, f"{synset}.tar", inner.getvalue())
  with tarfile.open(manual / "ILSVRC2012_img_val.tar", "w") as val:
    for i in range(1, 6):
      _add(val, f"ILSVRC2012_val_{i:08d}.JPEG", _jpeg(100 + i))
  return str(manual)


def test_imagenet2012_builds_from_manual_tars(imagenet_manual_dir, tmp_path):
  config = make_config(dataset="imagenet2012", manual_dir=imagenet_manual_dir,
                       data_dir=str(tmp_path), batch_size=2, eval_batch_size=4)
  info = data.dataset_info(config)
  assert (info.num_classes, info.num_train_examples, info.num_eval_examples) == (1000, 6, 5)
  assert info.eval_split == "validation"
  labels_dir = os.path.dirname(tfds.builder_cls("imagenet2012").code_path)
  with open(os.path.join(labels_dir, "labels.txt")) as f:
    synsets = f.read().split()
  with open(os.path.join(labels_dir, "validation_labels.txt")) as f:
    val_synsets = f.read().split()[:5]
  batch = all_eval(config)
  assert batch["image"].shape == (8, 32, 32, 3) and batch["mask"].sum() == 5
  assert sorted(batch["label"][batch["mask"]]) == sorted(synsets.index(s) for s in val_synsets)
  train = next(data.train_iterator(config))
  assert train["image"].shape == (2, 32, 32, 3) and train["label"].shape == (2,)
  # Labels are the three training synsets' (mixup mixes them in the train step).
  assert set(train["label"]) <= {synsets.index(s) for s in SYNSETS}


def test_imagenet2012_missing_tars_named(tmp_path):
  config = make_config(dataset="imagenet2012", manual_dir=str(tmp_path / "manual"),
                       data_dir=str(tmp_path / "tfds"))
  with pytest.raises(data.DatasetError) as e:
    data.dataset_info(config)
  message = str(e.value)
  assert "ILSVRC2012_img_train.tar" in message and "ILSVRC2012_img_val.tar" in message
  assert str(tmp_path / "manual") in message and "\n" not in message


# tfds mock data: random examples of the real feature specs (imagenet2012: 5-49 px images).

@pytest.mark.parametrize("name,num_classes", [("imagenet2012", 1000), ("imagenette", 10)])
def test_tfds_mock_data_shapes(name, num_classes, tmp_path):
  manual = tmp_path / "manual"
  os.makedirs(manual)
  for tar in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"):
    (manual / tar).touch()  # the builder is mocked; our check only wants the files present
  config = make_config(dataset=name, data_dir=str(tmp_path / "tfds"), manual_dir=str(manual),
                       eval_split="validation", batch_size=4, eval_batch_size=4, image_size=40)
  with tfds.testing.mock_data(num_examples=7):
    info = data.dataset_info(config)
    assert (info.num_classes, info.num_train_examples, info.num_eval_examples) == (
        num_classes, 7, 7)
    train = next(data.train_iterator(config))
    assert train["image"].shape == (4, 40, 40, 3) and train["image"].dtype == np.uint8
    assert train["label"].shape == (4,) and (train["label"] < num_classes).all()
    batch = all_eval(config)
  assert batch["image"].shape == (8, 40, 40, 3) and batch["mask"].tolist() == [True] * 7 + [False]
  assert np.isfinite(batch["image"]).all()


# Image folders (tfds ImageFolder).

def _write_image(path, seed: int, fmt: str, size=(30, 40)):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  pixels = np.random.default_rng(seed).integers(0, 256, size + (3,), dtype=np.uint8)
  Image.fromarray(pixels).save(path, fmt)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("folder")
  for split, count in (("train", 5), ("val", 3)):
    for k, name in enumerate(("cat", "dog")):
      for i in range(count):
        ext, fmt = (".png", "PNG") if i % 2 else (".jpg", "JPEG")
        _write_image(str(root / split / name / f"{i}{ext}"), 100 * k + i, fmt)
  return str(root)


def test_image_folder(image_folder):
  config = make_config(dataset=f"folder:{image_folder}", batch_size=4, eval_batch_size=4)
  info = data.dataset_info(config)
  assert (info.num_classes, info.num_train_examples, info.num_eval_examples) == (2, 10, 6)
  assert info.eval_split == "val"
  batch = all_eval(config)
  assert batch["mask"].sum() == 6 and sorted(batch["label"][batch["mask"]]) == [0, 0, 0, 1, 1, 1]
  train = next(data.train_iterator(config))
  assert train["image"].shape == (4, 32, 32, 3) and train["label"].shape == (4,)


@pytest.mark.parametrize("layout,match", [
    ("missing", "does not exist"),
    ("empty", "holds no images"),
    ("flat", "holds no images"),
    ("one_class", "at least 2"),
])
def test_image_folder_bad_layouts(tmp_path, layout, match):
  root = tmp_path / "root"
  if layout != "missing":
    os.makedirs(root)
  if layout == "flat":  # images directly under the split, no class folders
    _write_image(str(root / "train" / "a.jpg"), 0, "JPEG")
  if layout == "one_class":
    _write_image(str(root / "train" / "only" / "a.jpg"), 0, "JPEG")
  with pytest.raises(data.DatasetError, match=match):
    data.dataset_info(make_config(dataset=f"folder:{root}"))


def test_corrupt_image_stops_naming_the_file(tmp_path):
  root = tmp_path / "root"
  for k, name in enumerate(("a", "b")):
    for i in range(3):
      _write_image(str(root / "train" / name / f"{i}.jpg"), 10 * k + i, "JPEG")
  bad = root / "train" / "b" / "broken.jpg"
  bad.write_bytes(b"this is not an image")
  # check_data=False: the pipeline's own check (the up-front one is in test_data_faults.py).
  config = make_config(dataset=f"folder:{root}", eval_split="train", eval_batch_size=7,
                       check_data=False)
  with pytest.raises(data.DatasetError) as e:
    all_eval(config)
  assert str(bad) in str(e.value) and "corrupt image file" in str(e.value)


def test_unknown_dataset_and_split():
  with pytest.raises(data.DatasetError, match="unknown dataset 'no_such_dataset_xyz'"):
    data.dataset_info(make_config(dataset="no_such_dataset_xyz"))


def test_unknown_split(tiny_fashion_mnist, tfds_data_dir):
  config = make_config(fashion_mnist_dir=tiny_fashion_mnist, data_dir=tfds_data_dir,
                       eval_split="validation")
  with pytest.raises(data.DatasetError, match="no split 'validation'"):
    data.dataset_info(config)


def test_image_folder_process_shards_cover_once(image_folder):
  config = make_config(dataset=f"folder:{image_folder}", eval_batch_size=4)

  def image_keys(process_index, process_count):
    batches = data.eval_iterator(config, process_index=process_index,
                                 process_count=process_count)
    return [image.tobytes() for b in batches for image, m in zip(b["image"], b["mask"],
                                                                 strict=True) if m]

  everything = image_keys(0, 1)
  halves = [image_keys(i, 2) for i in range(2)]
  assert len(everything) == 6 and sorted(halves[0] + halves[1]) == sorted(everything)


@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"),
                    reason="dataset-fashion-mnist not installed")
def test_installed_fashion_mnist_files_parse():
  images, labels = fashion_mnist.read_split("/usr/share/datasets/fashion-mnist", "test")
  assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
  assert np.bincount(labels).tolist() == [1000] * 10  # the test set is balanced


QUIET_CHILD = """
import sys
import ml_collections
from pvt_jax import data
config = ml_collections.ConfigDict({"fashion_mnist_dir": sys.argv[1], "data_dir": sys.argv[2]})
print(data.dataset_info(config).num_classes)
"""


def test_importing_and_opening_are_quiet(tiny_fashion_mnist, tfds_data_dir):
  # Every CLI start imports pvt_jax.data and opens the dataset: TF's C++ INFO lines and tfds'
  # "custom data configuration" warning would print each time.
  data.dataset_info(make_config(fashion_mnist_dir=tiny_fashion_mnist, data_dir=tfds_data_dir))
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  proc = subprocess.run([sys.executable, "-c", QUIET_CHILD, tiny_fashion_mnist, tfds_data_dir],
                        env={**env, "PYTHONPATH": repo}, capture_output=True, text=True,
                        timeout=120, check=True)
  assert proc.stdout.split() == ["10"]
  for noise in ("cpu_feature_guard", "Using custom data configuration"):
    assert noise not in proc.stderr
