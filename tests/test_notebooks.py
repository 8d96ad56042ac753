"""The notebooks run end to end offline, and are stored without outputs."""

import json
import os
import re
import tempfile
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
COLAB_URL = "https://colab.research.google.com/github/pvt-jax/pvt_jax/blob/main/notebooks/{}"


def with_parameters(notebook, **values):
  """Papermill's convention without papermill: a cell after the one tagged "parameters"."""
  (index,) = [i for i, cell in enumerate(notebook.cells)
              if "parameters" in cell.metadata.get("tags", [])]
  overrides = "\n".join(f"{name} = {value!r}" for name, value in values.items())
  notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(overrides))
  return notebook


def execute(name, tmp_path, monkeypatch, **values):
  """Runs the notebook from the repository root (as after `%cd pvt_jax` in Colab)."""
  notebook = with_parameters(nbformat.read(ROOT / "notebooks" / name, as_version=4),
                             WORKDIR=str(tmp_path), **values)
  # The kernel, and the command lines it starts, import this checkout and share the suite's
  # persistent compilation cache (tests/test_train.py), so a program compiles once.
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", os.environ.get(
      "PVT_JAX_TEST_COMPILE_CACHE", os.path.join(tempfile.gettempdir(),
                                                 "pvt_jax_test_compile_cache")))
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  NotebookClient(notebook, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(ROOT)}}).execute()
  return notebook


def text_output(notebook):
  return "\n".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                   for output in cell.get("outputs", []))


def image_outputs(notebook):
  return [output for cell in notebook.cells for output in cell.get("outputs", [])
          if "image/png" in output.get("data", {})]


def test_there_are_three_notebooks():
  assert [p.name for p in NOTEBOOKS] == [
      "01_inference.ipynb", "02_finetune.ipynb", "03_convert_verify.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_without_outputs(path):
  notebook = json.loads(path.read_text())
  for cell in notebook["cells"]:
    if cell["cell_type"] == "code":
      assert cell["outputs"] == [] and cell["execution_count"] is None, cell["source"][:80]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_opens_in_colab(path):
  first = nbformat.read(path, as_version=4).cells[0]
  assert first.cell_type == "markdown"
  assert COLAB_URL.format(path.name) in first.source


def test_inference_notebook(tmp_path, monkeypatch):
  notebook = execute("01_inference.ipynb", tmp_path, monkeypatch, WEIGHTS_URL="")
  text = text_output(notebook)
  assert "random" in text  # the offline stand-in was announced
  top5 = re.findall(r"^\s*(\d+\.\d+)%\s+\S", text, re.M)
  assert len(top5) == 5 and sorted(map(float, top5), reverse=True) == list(map(float, top5))
  assert len(image_outputs(notebook)) == 1  # the photo and the four feature maps in one figure
  assert (tmp_path / "pvt_v2_b0_flax").is_dir()


def test_finetune_notebook(tmp_path, tiny_fashion_mnist, tfds_data_dir, monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", tfds_data_dir)  # the trainer started by the notebook
  notebook = execute("02_finetune.ipynb", tmp_path, monkeypatch, WEIGHTS_URL="",
                     FASHION_MNIST_DIR=str(tiny_fashion_mnist), IMAGE_SIZE=32, BATCH_SIZE=8,
                     TRAIN_STEPS=4, LOG_EVERY=2, EVAL_EVERY=4)
  records = [json.loads(line) for line in (tmp_path / "finetune" / "metrics.jsonl").open()]
  assert [r["step"] for r in records if "train/loss" in r] == [2, 4]
  assert len(image_outputs(notebook)) == 1  # one live figure, updated in place
  scores = json.loads(re.search(r"^\{.*?^\}", text_output(notebook), re.S | re.M).group(0))
  assert scores["step"] == 4 and 0.0 <= scores["top1"] <= 1.0


def test_convert_verify_notebook(tmp_path, monkeypatch):
  notebook = execute("03_convert_verify.ipynb", tmp_path, monkeypatch, WEIGHTS_URL="")
  text = text_output(notebook)
  worst = [float(x) for x in re.findall(r"(\d\.\de-\d\d)", text)]
  assert len(worst) == 10 and max(worst) < 5e-5  # logits + 4 maps, for 2 inputs
  assert "bit-identical" in text
  assert len(image_outputs(notebook)) == 1
