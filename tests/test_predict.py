"""python -m pvt_jax.predict: the eval pipeline's transform, top-k with class names, one-line
errors, for a training workdir and a converted checkpoint."""

import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from pvt_jax import data
from pvt_jax.checkpoints import save_converted
from pvt_jax.configs import classification
from pvt_jax.data import batch_augment
from pvt_jax.models import create_model
from pvt_jax.predict import Classifier
from pvt_jax.train import checkpointing, workdir

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("cat", "dog")


def run_predict(*args):
  return subprocess.Popen([sys.executable, "-m", "pvt_jax.predict", *map(str, args)], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"})


def finished(process):
  stdout, stderr = process.communicate(timeout=600)
  return process.returncode, stdout, stderr


def predictions(stdout: str) -> dict[str, list[tuple[float, str]]]:
  """{image path: [(probability, name)]} from the CLI's output."""
  result, current = {}, None
  for line in stdout.splitlines():
    found = re.fullmatch(r"\s+(\d+\.\d\d)%  (.+)", line)
    if found:
      result[current].append((float(found.group(1)) / 100, found.group(2)))
    else:
      current = line
      result[current] = []
  return result


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
  """An image folder dataset (train/ and val/, two classes), JPEGs and PNGs of odd sizes."""
  root = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  for split in ("train", "val"):
    for name in CLASSES:
      os.makedirs(root / split / name)
      for i, (fmt, size) in enumerate((("JPEG", (40, 30)), ("PNG", (37, 53)))):
        pixels = rng.integers(0, 256, size + (3,), dtype=np.uint8)
        Image.fromarray(pixels).save(root / split / name / f"{i}.{fmt.lower()}", fmt)
  return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(workdir, params): a training workdir as the trainer leaves it, records and a best
  checkpoint, for B0 at 32 px with the two classes of `folder`."""
  path = str(tmp_path_factory.mktemp("workdir"))
  config = classification.get_config("b0", "runlocal")
  params = create_model("b0", num_classes=2).init(jax.random.key(1),
                                                  np.zeros((1, 32, 32, 3)))["params"]
  ckpts = checkpointing.TrainCheckpoints(path)
  ckpts.save(3, {"params": params, "step": np.asarray(3, np.int32)}, metrics={"top1": 0.5})
  ckpts.close()
  workdir.write_records(path, config, 2, {"name": "folder", "class_names": list(CLASSES)})
  return path, params


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """(directory, params) of a converted 1000-class B0 checkpoint (random weights)."""
  path = str(tmp_path_factory.mktemp("converted") / "pvt_v2_b0")
  params = create_model("b0").init(jax.random.key(2), np.zeros((1, 32, 32, 3)))["params"]
  save_converted(path, params, {"variant": "b0", "num_classes": 1000, "source_file": "x.pth",
                                "source_sha256": "0" * 64, "source_format": "timm"})
  return path, params


def expected_top_k(model, params, image, k):
  probabilities = np.asarray(jax.nn.softmax(model.apply({"params": params}, image[None])[0]))
  best = np.argsort(-probabilities)[:k]
  return best, probabilities[best]


@pytest.mark.slow
def test_images_see_the_eval_pipelines_transform(folder, trained, tfds_data_dir):
  """Each image as `evaluate` would see it in a folder dataset of the workdir's config."""
  path, _ = trained
  classifier = Classifier(path)
  config = workdir.load_run_config(path)
  config.dataset, config.data_dir, config.eval_batch_size = f"folder:{folder}", tfds_data_dir, 4
  batches = list(data.eval_iterator(config))
  pipeline = np.asarray(batch_augment.normalize(  # the eval step normalises the uint8 batches
      np.concatenate([b["image"][b["mask"]] for b in batches])))
  ours = [classifier.preprocess(str(p)) for p in sorted(folder.glob("val/*/*"))]
  assert len(ours) == len(pipeline) == 4 and ours[0].shape == (32, 32, 3)
  for image in ours:  # the pipeline's order is its own
    assert min(np.abs(image - other).max() for other in pipeline) < 1e-5


@pytest.mark.slow
def test_cli_prints_top_k_with_the_workdirs_class_names(folder, trained):
  path, params = trained
  cat, dog = folder / "val" / "cat", folder / "val" / "dog" / "1.png"
  code, stdout, stderr = finished(run_predict(f"--checkpoint={path}", "--top_k=2", cat, dog))
  assert code == 0, stderr
  shown = predictions(stdout)
  assert list(shown) == [str(cat / "0.jpeg"), str(cat / "1.png"), str(dog)]
  classifier, model = Classifier(path), create_model("b0", num_classes=2)
  for image, top in shown.items():
    indices, probabilities = expected_top_k(model, params, classifier.preprocess(image), 2)
    assert [name for _, name in top] == [CLASSES[i] for i in indices]
    np.testing.assert_allclose([p for p, _ in top], probabilities, atol=5e-5)


@pytest.mark.slow
@pytest.mark.torch
def test_cli_names_imagenet_classes_for_a_converted_checkpoint(folder, converted):
  from timm.data import ImageNetInfo

  path, params = converted
  image = folder / "val" / "dog" / "0.jpeg"
  code, stdout, stderr = finished(run_predict(f"--checkpoint={path}", image))
  assert code == 0, stderr
  (top,) = predictions(stdout).values()
  indices, probabilities = expected_top_k(create_model("b0"), params,
                                          Classifier(path).preprocess(str(image)), 5)
  assert [name for _, name in top] == [ImageNetInfo().index_to_description(int(i))
                                       for i in indices]
  np.testing.assert_allclose([p for p, _ in top], probabilities, atol=5e-5)


@pytest.mark.slow
def test_bad_input_is_one_line(folder, trained, tmp_path):
  path, _ = trained
  (tmp_path / "notes.jpg").write_text("not an image")
  (tmp_path / "empty").mkdir()
  cases = {
      "no such image or folder": [f"--checkpoint={path}", tmp_path / "missing.jpg"],
      "is not an image": [f"--checkpoint={path}", tmp_path / "notes.jpg"],
      "no images": [f"--checkpoint={path}", tmp_path / "empty"],
      "no such checkpoint directory": [f"--checkpoint={tmp_path / 'nothing'}",
                                       folder / "val" / "cat"],
      "no images given": [f"--checkpoint={path}"],
  }
  processes = {expected: run_predict(*args) for expected, args in cases.items()}
  for expected, process in processes.items():
    code, stdout, stderr = finished(process)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 1 and len(errors) == 1 and expected in errors[0], (expected, stderr[-2000:])
    assert "Traceback" not in stderr and stdout == ""
