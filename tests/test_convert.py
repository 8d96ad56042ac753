"""`python -m pvt_jax.convert`: conversion, export round trips, --num_classes, --verify, and one
test per kind of bad input (one-line error, exit status 1, nothing left behind)."""

import functools
import hashlib
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import safetensors.numpy
import timm
import torch
from absl import flags
from PIL import Image
from torch_reference import hf_names, key_table, random_timm_model, save, state_dict_in

from pvt_jax import convert
from pvt_jax.checkpoints import load_converted, load_pretrained, verify
from pvt_jax.models import VARIANTS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_convert(*args):
  flag_values = flags.FlagValues()
  convert.define_flags(flag_values)
  flag_values(["convert", *args])
  return convert.run(flag_values)


def table_state_dict(variant, layout="official", seed=0):
  """Random weights of the right names and shapes, straight from the key table (no timm)."""
  rng = np.random.default_rng(seed)
  out = {}
  for row in key_table(variant):
    value = rng.standard_normal(row["shape"], dtype=np.float32)
    names = {"official": (row["official"],), "timm": (row["timm"],), "hf": hf_names(row)}[layout]
    for name, rows in zip(names, np.split(value, len(names)), strict=True):
      out[name] = rows
  return out


@pytest.fixture(scope="module")
def b0_model():
  return random_timm_model("b0", seed=1)


@pytest.fixture(scope="module")
def b0_converted(b0_model, tmp_path_factory):
  """A b0 converted from a timm-layout safetensors file (the source file is kept)."""
  root = tmp_path_factory.mktemp("b0")
  source = save(root / "model.safetensors", state_dict_in("timm", b0_model, "b0"))
  assert run_convert(f"--input={source}", f"--output={root / 'converted'}") == 0
  return root / "converted"


def backbone(variables):
  return {"params": {name: p for name, p in variables["params"].items() if name != "head"}}


# ---------------------------------------------------------------------------- good conversions


def test_subprocess_convert_with_verify(b0_model, tmp_path):
  source = save(tmp_path / "pvt_v2_b0.pth", state_dict_in("official", b0_model, "b0"))
  output = tmp_path / "converted"
  result = subprocess.run(
      [sys.executable, "-m", "pvt_jax.convert", f"--input={source}", f"--output={output}",
       "--variant=b0", "--verify"], capture_output=True, text=True, cwd=REPO,
      env={**os.environ, "PYTHONPATH": REPO}, timeout=300)
  assert result.returncode == 0, result.stderr
  assert result.stderr == ""  # no log spam
  assert "verify against timm pvt_v2_b0" in result.stdout
  metadata = load_converted(output).metadata
  assert metadata["source_format"] == "official" and metadata["num_classes"] == 1000
  assert metadata["source_file"] == str(source)
  assert metadata["source_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
  assert metadata["format_version"] == 1


def test_help_explains_usage():
  result = subprocess.run([sys.executable, "-m", "pvt_jax.convert", "--help"], capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, timeout=120)
  assert "Traceback" not in result.stderr  # absl's --help exits with status 1 by design
  for text in ("--export", "--num_classes", "--verify", "eps 1e-6", "weights_only=True"):
    assert text in result.stdout


@pytest.mark.parametrize("layout,filename", [("official", "export.pth"),
                                             ("timm", "export.safetensors"),
                                             ("hf", "export.safetensors"), ("hf", "export.bin")])
def test_export_round_trip_is_bit_exact(layout, filename, b0_model, b0_converted, tmp_path):
  exported = tmp_path / filename
  assert run_convert(f"--export={layout}", f"--input={b0_converted}", f"--output={exported}") == 0
  if filename.endswith(".safetensors"):
    tensors = safetensors.numpy.load_file(exported)
  else:
    tensors = {k: v.numpy() for k, v in torch.load(exported, weights_only=True).items()}
  expected = state_dict_in(layout, b0_model, "b0")
  assert sorted(tensors) == sorted(expected)  # exactly the key table's names for this layout
  for key, value in expected.items():
    np.testing.assert_array_equal(tensors[key], value, err_msg=key)

  if layout != "hf":  # timm reads the timm layout, and the official one via its own remapping
    model = timm.create_model("pvt_v2_b0", pretrained=False)
    weights = {k: torch.from_numpy(v) for k, v in tensors.items()}
    model.load_state_dict(timm.models.pvt_v2.checkpoint_filter_fn(weights, model), strict=True)

  again = tmp_path / "again"
  assert run_convert(f"--input={exported}", f"--output={again}") == 0
  first, second = load_converted(b0_converted), load_converted(again)
  jax.tree.map(np.testing.assert_array_equal, second.params, first.params)
  assert second.metadata["source_format"] == layout


def test_new_num_classes_drops_the_head(b0_converted, tmp_path):
  source = load_converted(b0_converted).metadata["source_file"]
  output = tmp_path / "ten"
  assert run_convert(f"--input={source}", f"--output={output}", "--num_classes=10") == 0
  checkpoint = load_converted(output)
  assert checkpoint.metadata["num_classes"] == 10 and "head" not in checkpoint.params

  model, variables = load_pretrained(output)  # a fresh 10-class head, official init
  head = variables["params"]["head"]
  assert model.num_classes == 10 and head["kernel"].shape == (256, 10)
  np.testing.assert_array_equal(head["bias"], 0)
  assert 0.01 < np.std(head["kernel"]) < 0.03
  x = np.random.default_rng(0).standard_normal((1, 64, 64, 3), dtype=np.float32)
  _, original = load_pretrained(b0_converted)
  features = jax.jit(functools.partial(model.apply, method="features"))
  np.testing.assert_array_equal(features(backbone(variables), x)[-1],
                                features(backbone(original), x)[-1])  # the same backbone


def test_zero_classes_keeps_the_backbone(b0_converted, tmp_path):
  source = load_converted(b0_converted).metadata["source_file"]
  assert run_convert(f"--input={source}", f"--output={tmp_path / 'b'}", "--num_classes=0") == 0
  model, variables = load_pretrained(tmp_path / "b")
  assert model.num_classes == 0
  b0 = VARIANTS["b0"]
  assert sum(x.size for x in jax.tree.leaves(variables)) == (
      b0.official.params - (b0.embed_dims[-1] + 1) * 1000)


def test_verify_failure_removes_the_output(b0_converted, tmp_path, monkeypatch, capsys):
  source = load_converted(b0_converted).metadata["source_file"]
  differences = verify.Differences(output=1e-3, features=(0.0, 0.0, 0.0, 0.0))
  monkeypatch.setattr(verify, "compare_with_timm", lambda *args, **kwargs: differences)
  assert run_convert(f"--input={source}", f"--output={tmp_path / 'out'}", "--verify") == 1
  assert "verification failed" in capsys.readouterr().err
  assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------- bad inputs


def assert_fails(tmp_path, capsys, source, *extra, says):
  """Exit status 1, exactly one `error: <input>: ...` line naming `says`, nothing written."""
  before = set(os.listdir(tmp_path))
  assert run_convert(f"--input={source}", f"--output={tmp_path / 'out'}", *extra) == 1
  captured = capsys.readouterr()
  lines = captured.err.splitlines()
  assert len(lines) == 1, captured.err
  assert lines[0].startswith(f"error: {source}: "), lines[0]
  for text in says:
    assert text in lines[0], lines[0]
  assert set(os.listdir(tmp_path)) == before  # no output, no partial/hidden directory


def test_missing_key(tmp_path, capsys):
  state = table_state_dict("b0")
  del state["block2.1.attn.kv.weight"]
  source = save(tmp_path / "b0.pth", state)
  assert_fails(tmp_path, capsys, source, says=["missing key block2.1.attn.kv.weight"])


def test_missing_hf_value_half(tmp_path, capsys):
  state = table_state_dict("b0", "hf")
  del state["pvt_v2.encoder.layers.1.blocks.0.attention.value.weight"]
  source = save(tmp_path / "b0.safetensors", state)
  assert_fails(tmp_path, capsys, source,
               says=["missing key pvt_v2.encoder.layers.1.blocks.0.attention.value.weight"])


def test_unexpected_key(tmp_path, capsys):
  state = table_state_dict("b0", "timm")
  state["stages.0.blocks.0.attn.extra.weight"] = np.zeros((4,), np.float32)
  source = save(tmp_path / "b0.safetensors", state)
  assert_fails(tmp_path, capsys, source,
               says=["unexpected key stages.0.blocks.0.attn.extra.weight"])


def test_b2_weights_as_b3(tmp_path, capsys):
  source = save(tmp_path / "b2.pth", table_state_dict("b2"))
  assert_fails(tmp_path, capsys, source, "--variant=b3",
               says=["missing key block3.6.", "pvt_v2_b3", "the checkpoint is pvt_v2_b2"])


def test_shape_mismatch(tmp_path, capsys):
  source = save(tmp_path / "b1.pth", table_state_dict("b1"), wrap="model")
  assert_fails(tmp_path, capsys, source, "--variant=b0",
               says=["patch_embed1.proj.weight has shape [64, 3, 7, 7]", "expects [32, 3, 7, 7]",
                     "the checkpoint is pvt_v2_b1"])


def test_corrupted_tensor_shape(tmp_path, capsys):
  state = table_state_dict("b0", "timm")
  state["stages.2.blocks.1.mlp.fc1.weight"] = np.zeros((640, 161), np.float32)
  source = save(tmp_path / "b0.safetensors", state)
  assert_fails(tmp_path, capsys, source,
               says=["stages.2.blocks.1.mlp.fc1.weight has shape [640, 161]", "[640, 160]"])


def test_truncated_safetensors(tmp_path, capsys):
  data = save(tmp_path / "full.safetensors", table_state_dict("b0")).read_bytes()
  source = tmp_path / "cut.safetensors"
  source.write_bytes(data[: len(data) // 2])
  assert_fails(tmp_path, capsys, source, says=["truncated"])


def test_truncated_pth(tmp_path, capsys):
  data = save(tmp_path / "full.pth", table_state_dict("b0")).read_bytes()
  source = tmp_path / "cut.pth"
  source.write_bytes(data[: len(data) // 2])
  assert_fails(tmp_path, capsys, source, says=["truncated"])


def test_text_file(tmp_path, capsys):
  source = tmp_path / "notes.pth"
  source.write_text("these are not weights\n")
  assert_fails(tmp_path, capsys, source, says=["not a checkpoint"])


def test_png_file(tmp_path, capsys):
  source = tmp_path / "image.png"
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(source)
  assert_fails(tmp_path, capsys, source, says=["not a checkpoint"])


def test_unknown_layout(tmp_path, capsys):
  resnet = {"conv1.weight": np.zeros((64, 3, 7, 7), np.float32),
            "fc.weight": np.zeros((1000, 2048), np.float32)}
  source = save(tmp_path / "resnet.safetensors", resnet)
  assert_fails(tmp_path, capsys, source, says=["unknown checkpoint layout", "conv1.weight"])


def test_missing_input(tmp_path, capsys):
  assert_fails(tmp_path, capsys, tmp_path / "absent.pth", says=["no such file"])


class _RunsCode:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_not_executed(tmp_path, capsys):
  marker = tmp_path.parent / f"{tmp_path.name}-pwned"
  source = tmp_path / "evil.pth"
  torch.save({"model": {"patch_embed1.proj.weight": _RunsCode(marker)}}, source)
  assert_fails(tmp_path, capsys, source, says=["refused to unpickle", "system"])
  assert not marker.exists()


def test_malicious_pickle_in_a_subprocess(tmp_path):
  marker = tmp_path.parent / f"{tmp_path.name}-pwned"
  source = tmp_path / "evil.pth"
  torch.save(_RunsCode(marker), source)
  result = subprocess.run(
      [sys.executable, "-m", "pvt_jax.convert", f"--input={source}",
       f"--output={tmp_path / 'out'}"], capture_output=True, text=True, cwd=REPO,
      env={**os.environ, "PYTHONPATH": REPO}, timeout=120)
  assert result.returncode == 1
  assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"error: {source}: refused")
  assert "Traceback" not in result.stderr
  assert not marker.exists() and not (tmp_path / "out").exists()


def test_existing_output_is_not_replaced(b0_converted, tmp_path, capsys):
  source = load_converted(b0_converted).metadata["source_file"]
  output = tmp_path / "out"
  output.mkdir()
  (output / "keep.txt").write_text("precious")
  assert run_convert(f"--input={source}", f"--output={output}") == 1
  assert capsys.readouterr().err == f"error: {output}: already exists; remove it or choose " \
                                    "another output\n"
  assert os.listdir(output) == ["keep.txt"]


def test_export_needs_a_converted_checkpoint(tmp_path, capsys):
  source = save(tmp_path / "b0.safetensors", table_state_dict("b0"))
  assert run_convert("--export=timm", f"--input={source}", f"--output={tmp_path / 'x.pth'}") == 1
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "not a converted pvt_jax checkpoint" in err
  assert not (tmp_path / "x.pth").exists()


def test_safetensors_need_no_torch(b0_converted, tmp_path, monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails
  source = load_converted(b0_converted).metadata["source_file"]
  assert run_convert(f"--input={source}", f"--output={tmp_path / 'a'}") == 0
  exported = tmp_path / "hf.safetensors"
  assert run_convert("--export=hf", f"--input={tmp_path / 'a'}", f"--output={exported}") == 0
  pickled = tmp_path / "timm.pth"
  assert run_convert("--export=timm", f"--input={tmp_path / 'a'}", f"--output={pickled}") == 1
  assert "needs torch" in capsys.readouterr().err
  assert sorted(os.listdir(tmp_path)) == ["a", "hf.safetensors"]
