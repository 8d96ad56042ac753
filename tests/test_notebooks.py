"""The notebooks run end to end offline, as Jupyter and nbconvert run them (the kernel in the
notebook's own folder), write only under their WORKDIR, and are stored without outputs."""

import ast
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


def parameters_index(notebook) -> int:
  (index,) = [i for i, cell in enumerate(notebook.cells)
              if "parameters" in cell.metadata.get("tags", [])]
  return index


def parameter_names(notebook) -> set[str]:
  """The names the "parameters" cell assigns."""
  tree = ast.parse(notebook.cells[parameters_index(notebook)].source)
  return {target.id for node in tree.body if isinstance(node, ast.Assign)
          for target in node.targets if isinstance(target, ast.Name)}


def with_parameters(notebook, **values):
  """Papermill's convention without papermill: a cell after the one tagged "parameters"."""
  overrides = "\n".join(f"{name} = {value!r}" for name, value in values.items())
  notebook.cells.insert(parameters_index(notebook) + 1, nbformat.v4.new_code_cell(overrides))
  return notebook


def run_kernel(notebook, cwd, monkeypatch):
  """Executes `notebook` as nbconvert does, with the kernel started in `cwd`."""
  # The kernel, and the command lines it starts, import this checkout and share the suite's
  # persistent compilation cache (tests/test_train.py), so a program compiles once.
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", os.environ.get(
      "PVT_JAX_TEST_COMPILE_CACHE", os.path.join(tempfile.gettempdir(),
                                                 "pvt_jax_test_compile_cache")))
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  NotebookClient(notebook, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(cwd)}}).execute()
  return notebook


def text_output(notebook):
  return "\n".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                   for output in cell.get("outputs", []))


def image_outputs(notebook):
  return [output for cell in notebook.cells for output in cell.get("outputs", [])
          if "image/png" in output.get("data", {})]


def check_inference(notebook, workdir):
  text = text_output(notebook)
  assert "random" in text  # the offline stand-in was announced
  top5 = re.findall(r"^\s*(\d+\.\d+)%\s+\S", text, re.M)
  assert len(top5) == 5 and sorted(map(float, top5), reverse=True) == list(map(float, top5))
  assert len(image_outputs(notebook)) == 1  # the photo and the four feature maps in one figure
  assert (workdir / "pvt_v2_b0_flax").is_dir()


def check_finetune(notebook, workdir):
  records = [json.loads(line) for line in (workdir / "finetune" / "metrics.jsonl").open()]
  assert [r["step"] for r in records if "train/loss" in r] == [5, 10, 15, 20]  # the short mode
  assert len(image_outputs(notebook)) == 1  # one live figure, updated in place
  scores = json.loads(re.search(r"^\{.*?^\}", text_output(notebook), re.S | re.M).group(0))
  assert scores["step"] == 20 and 0.0 <= scores["top1"] <= 1.0


def check_convert_verify(notebook, workdir):
  text = text_output(notebook)
  worst = [float(x) for x in re.findall(r"(\d\.\de-\d\d)", text)]
  assert len(worst) == 10 and max(worst) < 5e-5  # logits + 4 maps, for 2 inputs
  assert "bit-identical" in text
  assert len(image_outputs(notebook)) == 1
  assert (workdir / "exported_pvt_v2_b0.pth").is_file()


# What each notebook must show beyond running without an error (others only have to run).
CHECKS = {"01_inference.ipynb": check_inference, "02_finetune.ipynb": check_finetune,
          "03_convert_verify.ipynb": check_convert_verify}


def files_under(directory: Path) -> set[Path]:
  return {p for p in directory.rglob("*") if ".ipynb_checkpoints" not in p.parts}


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


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
@pytest.mark.parametrize("kernel_folder", ["notebooks", "elsewhere"])
def test_notebook_outputs_default_to_the_clones_runs(path, kernel_folder, tmp_path, monkeypatch):
  """Up to its parameters: WORKDIR is in <clone>/runs/ whether the kernel starts in notebooks/
  (Jupyter, nbconvert) or outside the clone (found through the installed package)."""
  notebook = nbformat.read(path, as_version=4)
  notebook.cells = notebook.cells[:parameters_index(notebook) + 1]
  notebook.cells.append(nbformat.v4.new_code_cell(
      "import os\nprint('WORKDIR=' + os.path.abspath(WORKDIR))"))
  cwd = path.parent if kernel_folder == "notebooks" else tmp_path
  workdir = Path(re.search(r"^WORKDIR=(.*)$", text_output(run_kernel(notebook, cwd, monkeypatch)),
                           re.M).group(1))
  assert workdir.is_relative_to(ROOT / "runs"), workdir


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_offline_from_its_folder(path, tmp_path, tiny_fashion_mnist,
                                               tfds_data_dir, monkeypatch):
  """Each notebook in its short, offline mode, where its parameters offer one (WEIGHTS_URL = ""
  for random stand-in weights, SHORT = True), writing into the given WORKDIR only."""
  monkeypatch.setenv("TFDS_DATA_DIR", tfds_data_dir)  # the trainer started by the notebook
  notebook = nbformat.read(path, as_version=4)
  offline = {"WEIGHTS_URL": "", "SHORT": True, "FASHION_MNIST_DIR": str(tiny_fashion_mnist)}
  names = parameter_names(notebook)
  assert "WORKDIR" in names, "the parameters cell sets WORKDIR, where all outputs go"
  workdir = tmp_path / "workdir"
  notebook = with_parameters(notebook, WORKDIR=str(workdir),
                             **{k: v for k, v in offline.items() if k in names})
  before = files_under(ROOT / "notebooks")
  run_kernel(notebook, path.parent, monkeypatch)
  assert files_under(ROOT / "notebooks") == before  # nothing written beside the notebooks
  assert workdir.is_dir()
  if path.name in CHECKS:
    CHECKS[path.name](notebook, workdir)
