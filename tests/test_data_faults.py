"""Data faults: processes preparing one dataset at once, what preparing says, corrupt and missing
images. Everything in tmp dirs, in subprocesses where several processes are the point."""

import os
import subprocess
import sys

import pytest
from conftest import write_fashion_mnist
from test_data_sources import _write_image as write_image
from test_data_sources import make_config

from pvt_jax import data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A process that waits for its peer (both past their imports), then opens Fashion-MNIST; its
# example generation is slowed and logged, so that the two preparations would overlap.
PREPARING_CHILD = """
import os, sys, time
import ml_collections
from pvt_jax import data
from pvt_jax.data import fashion_mnist
source_dir, data_dir, sync, me = sys.argv[1:]
generate = fashion_mnist.FashionMnistLocal._generate_examples

def slow_generate(self, split):
  with open(os.path.join(sync, "generated"), "a") as f:
    f.write(split + "\\n")
  time.sleep(1.0)
  yield from generate(self, split)

fashion_mnist.FashionMnistLocal._generate_examples = slow_generate
open(os.path.join(sync, "ready" + me), "w").close()
while not all(os.path.exists(os.path.join(sync, "ready" + i)) for i in "01"):
  time.sleep(0.01)
info = data.dataset_info(ml_collections.ConfigDict({"fashion_mnist_dir": source_dir,
                                                    "data_dir": data_dir}))
print(info.num_train_examples, info.num_eval_examples)
"""


@pytest.mark.slow
def test_two_processes_prepare_one_dataset_once(tmp_path):
  source = write_fashion_mnist(str(tmp_path / "idx"), 40, 10)
  data_dir, sync = tmp_path / "tfds", tmp_path / "sync"
  sync.mkdir()
  env = {**os.environ, "PYTHONPATH": REPO}
  procs = [subprocess.Popen([sys.executable, "-c", PREPARING_CHILD, source, str(data_dir),
                             str(sync), me], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for me in "01"]
  outputs = [proc.communicate(timeout=300) for proc in procs]
  for proc, (out, err) in zip(procs, outputs, strict=True):
    assert proc.returncode == 0, err[-3000:]
    assert out.split() == ["40", "10"]
  # One process prepared (each split generated once), the other waited and reused its copy.
  assert sorted((sync / "generated").read_text().split()) == ["test", "train"]
  announcements = [err for _, err in outputs if "preparing Fashion-MNIST" in err]
  assert len(announcements) == 1
  (line,) = [s for s in announcements[0].splitlines() if s.startswith("preparing Fashion-MNIST")]
  assert f"into {data_dir}" in line and "TFDS_DATA_DIR" in line
  for _, err in outputs:
    for noise in ("Downloading and preparing", "Unknown size", "Variant folder"):
      assert noise not in err
  prepared = data_dir / "fashion_mnist_local"
  (config_dir,) = prepared.iterdir()
  assert not [p.name for p in config_dir.iterdir() if p.name.startswith("incomplete")]


@pytest.mark.slow
def test_fashion_mnist_goes_to_tfds_data_dir(tmp_path):
  """Without config.data_dir the copy goes to $TFDS_DATA_DIR (not the home directory)."""
  source = write_fashion_mnist(str(tmp_path / "idx"), 20, 10)
  child = ("import sys, ml_collections\nfrom pvt_jax import data\n"
           "print(data.dataset_info(ml_collections.ConfigDict("
           "{'fashion_mnist_dir': sys.argv[1]})).num_train_examples)")
  home, tfds_dir = tmp_path / "home", tmp_path / "elsewhere"
  home.mkdir()
  result = subprocess.run([sys.executable, "-c", child, source], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": REPO, "HOME": str(home),
                                            "TFDS_DATA_DIR": str(tfds_dir)})
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.split() == ["20"]
  assert f"into {tfds_dir}/fashion_mnist_local/" in result.stderr
  assert (tfds_dir / "fashion_mnist_local").is_dir()
  assert not (home / "tensorflow_datasets").exists()


# Image folders with a bad file or an empty class folder.

def folder_with_classes(root, names=("a", "b", "c", "d"), per_class=2, splits=("train", "val")):
  for split in splits:
    for k, name in enumerate(names):
      for i in range(per_class):
        write_image(str(root / split / name / f"{i}.jpg"), 10 * k + i, "JPEG")
  return root


def truncate(path, keep: float = 0.5):
  payload = path.read_bytes()
  path.write_bytes(payload[:int(len(payload) * keep)])


def folder_config(root, **overrides):
  return make_config(dataset=f"folder:{root}", batch_size=4, eval_batch_size=4, **overrides)


def test_truncated_jpeg_stops_training_naming_the_file(tmp_path):
  root = folder_with_classes(tmp_path / "root")
  bad = root / "train" / "c" / "1.jpg"
  truncate(bad)
  config = folder_config(root, check_data=False)  # as if it went bad after the start
  with pytest.raises(data.DatasetError) as e:
    for _ in data.train_iterator(config):
      pass
  message = str(e.value)
  assert f"cannot decode {bad}" in message and "\n" not in message
  assert "jpeg::Uncompress failed" in message  # TensorFlow's reason, without its wrapping
  assert "{{" not in message and "user-defined function" not in message


def test_truncated_jpeg_in_eval_names_the_file(tmp_path):
  root = folder_with_classes(tmp_path / "root")
  bad = root / "val" / "a" / "0.jpg"
  truncate(bad)
  with pytest.raises(data.DatasetError, match=f"cannot decode {bad}"):
    list(data.eval_iterator(folder_config(root, check_data=False)))


@pytest.mark.parametrize("damage", ["truncated_jpeg", "truncated_png", "not_an_image"])
def test_bad_validation_file_is_refused_before_training(tmp_path, damage):
  root = folder_with_classes(tmp_path / "root")
  bad = root / "val" / "d" / ("x.png" if damage == "truncated_png" else "x.jpg")
  if damage == "not_an_image":
    bad.write_bytes(b"<html>an error page saved as a .jpg</html>")
  else:
    write_image(str(bad), 99, "PNG" if damage == "truncated_png" else "JPEG")
    truncate(bad, 0.6)
  with pytest.raises(data.DatasetError) as e:
    data.dataset_info(folder_config(root))  # what the trainer opens before its first step
  message = str(e.value)
  assert str(bad) in message and "1 unreadable image file" in message and "\n" not in message
  assert "config.check_data=False" in message and "{{" not in message and "[Op:" not in message


def test_trailing_bytes_after_the_jpeg_end_are_accepted(tmp_path):
  """Some cameras append data after a JPEG's end marker; TensorFlow decodes those files."""
  root = folder_with_classes(tmp_path / "root", names=("a", "b"))
  odd = root / "val" / "b" / "0.jpg"
  odd.write_bytes(odd.read_bytes() + bytes(range(256)) * 40)  # 10 kB after the end marker
  info = data.dataset_info(folder_config(root))
  assert (info.num_classes, info.num_train_examples, info.num_eval_examples) == (2, 4, 4)
  assert sum(int(b["mask"].sum()) for b in data.eval_iterator(folder_config(root))) == 4


@pytest.mark.parametrize("split", ["train", "val"])
def test_empty_class_folder_is_refused(tmp_path, split):
  root = folder_with_classes(tmp_path / "root")
  for image in (root / split / "b").iterdir():
    image.unlink()
  with pytest.raises(data.DatasetError) as e:
    data.dataset_info(folder_config(root))
  message = str(e.value)
  assert f"first {root / split / 'b'};" in message and "without images" in message
  assert "\n" not in message
