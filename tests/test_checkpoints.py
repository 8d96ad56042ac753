"""pvt_jax.checkpoints: key layouts against the reference key tables, detection, file reading,
orbax storage and head replacement (CLI behaviour is in test_convert, numerics in test_parity)."""

import math
import os

import jax
import numpy as np
import pytest
import torch
from flax import traverse_util
from torch_reference import hf_names, key_table, save

from pvt_jax.checkpoints import (
    CheckpointError,
    convert_state_dict,
    detect_variant,
    export_state_dict,
    layouts,
    load_converted,
    load_pretrained,
    read_state_dict,
    replace_head,
    save_converted,
    store,
)
from pvt_jax.models import V2_VARIANTS, VARIANTS

METADATA = {"variant": "b0", "num_classes": 1000, "source_file": "/src/pvt_v2_b0.pth",
            "source_sha256": "0" * 64, "source_format": "official"}


def table_shapes(variant, layout, with_head=True):
  out = {}
  for row in key_table(variant):
    if row["official"].startswith("head.") and not with_head:
      continue
    names = {"official": (row["official"],), "timm": (row["timm"],), "hf": hf_names(row)}[layout]
    for name in names:
      out[name] = (row["shape"][0] // len(names), *row["shape"][1:])
  return out


def count(shapes):
  return sum(math.prod(shape) for shape in shapes.values())


def zeros_like_table(variant, layout, with_head=True):
  return {key: np.zeros(shape, np.float32)
          for key, shape in table_shapes(variant, layout, with_head).items()}


@pytest.fixture(scope="module")
def b0_params():
  rng = np.random.default_rng(0)
  state = {key: rng.standard_normal(shape, dtype=np.float32)
           for key, shape in table_shapes("b0", "official").items()}
  return convert_state_dict(state).params


@pytest.mark.parametrize("variant", V2_VARIANTS)
def test_key_tables_have_the_official_parameter_counts(variant):
  v = VARIANTS[variant]
  with_head, without_head = v.official.params, v.official.params - (v.embed_dims[-1] + 1) * 1000
  for layout in layouts.FORMATS:
    assert count(table_shapes(variant, layout)) == with_head
    assert count(table_shapes(variant, layout, with_head=False)) == without_head


@pytest.mark.parametrize("layout", layouts.FORMATS)
@pytest.mark.parametrize("variant", V2_VARIANTS)
def test_expected_keys_and_shapes_equal_the_key_table(variant, layout):
  assert layouts.expected_shapes(variant, 1000, layout) == table_shapes(variant, layout)
  assert layouts.expected_shapes(variant, 0, layout) == table_shapes(variant, layout, False)


@pytest.mark.parametrize("variant", V2_VARIANTS)
def test_variant_is_detected_from_shapes(variant):
  assert detect_variant(table_shapes(variant, "official")) == variant


@pytest.mark.parametrize("layout", layouts.FORMATS)
@pytest.mark.parametrize("variant,with_head", [("b0", True), ("b2_li", False)])
def test_layout_variant_and_classes_are_detected(variant, with_head, layout):
  conversion = convert_state_dict(zeros_like_table(variant, layout, with_head))
  assert (conversion.variant, conversion.source_format) == (variant, layout)
  assert conversion.num_classes == (1000 if with_head else 0)
  assert ("head" in conversion.params) == with_head


def test_flax_layout_transposes_linear_and_conv_weights(b0_params):
  state = export_state_dict(b0_params, "official")
  stage1 = b0_params["stage1"]
  np.testing.assert_array_equal(stage1["block0"]["attn"]["kv"]["kernel"],
                                state["block1.0.attn.kv.weight"].T)
  np.testing.assert_array_equal(stage1["patch_embed"]["proj"]["kernel"][2, 5, 1, 7],
                                state["patch_embed1.proj.weight"][7, 1, 2, 5])  # [out,in,kh,kw]
  np.testing.assert_array_equal(stage1["block1"]["mlp"]["dwconv"]["kernel"][0, 2, 0, 9],
                                state["block1.1.mlp.dwconv.dwconv.weight"][9, 0, 0, 2])
  np.testing.assert_array_equal(stage1["norm"]["scale"], state["norm1.weight"])


def test_hf_key_and_value_are_the_rows_of_official_kv(b0_params):
  official, hf = export_state_dict(b0_params, "official"), export_state_dict(b0_params, "hf")
  kv = official["block3.1.attn.kv.weight"]
  prefix = "pvt_v2.encoder.layers.2.blocks.1.attention."
  np.testing.assert_array_equal(hf[prefix + "key.weight"], kv[:160])
  np.testing.assert_array_equal(hf[prefix + "value.weight"], kv[160:])


def test_reader_unwraps_training_checkpoints(tmp_path):
  state = zeros_like_table("b0", "official")
  for wrapper in ("model", "state_dict"):
    read = read_state_dict(save(tmp_path / f"{wrapper}.pth", state, wrap=wrapper))
    assert sorted(read) == sorted(state)


def test_reader_upcasts_bfloat16(tmp_path):
  torch.save({"w": torch.ones(3, dtype=torch.bfloat16)}, tmp_path / "bf16.pth")
  assert read_state_dict(tmp_path / "bf16.pth")["w"].dtype == np.float32


def test_reader_rejects_non_tensor_entries(tmp_path):
  torch.save({"patch_embed1.proj.weight": [1.0, 2.0]}, tmp_path / "list.pth")
  with pytest.raises(CheckpointError, match="'patch_embed1.proj.weight' is a list, not a tensor"):
    read_state_dict(tmp_path / "list.pth")


@pytest.mark.parametrize("zipped", [True, False])
def test_pytorch_files_named_safetensors_are_read_by_their_contents(tmp_path, zipped):
  """torch.load hands any path ending in .safetensors to the safetensors reader (a
  SafetensorError traceback for a real PyTorch file); the reader goes by the file's bytes."""
  state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
  path = tmp_path / "misnamed.safetensors"
  torch.save(state, path, _use_new_zipfile_serialization=zipped)
  np.testing.assert_array_equal(read_state_dict(path)["w"], state["w"].numpy())
  torch.save({"w": [1.0]}, path, _use_new_zipfile_serialization=zipped)
  with pytest.raises(CheckpointError, match="'w' is a list, not a tensor"):
    read_state_dict(path)


def test_integer_tensors_are_rejected():
  state = zeros_like_table("b0", "official")
  state["norm4.bias"] = state["norm4.bias"].astype(np.int64)
  with pytest.raises(CheckpointError, match="norm4.bias has dtype int64"):
    convert_state_dict(state)


def test_save_and_load_converted_round_trip(b0_params, tmp_path):
  save_converted(tmp_path / "ckpt", b0_params, METADATA)
  checkpoint = load_converted(tmp_path / "ckpt")
  assert checkpoint.metadata == {**METADATA, "format_version": 1}
  jax.tree.map(np.testing.assert_array_equal, checkpoint.params, b0_params)
  assert all(isinstance(leaf, np.ndarray) for leaf in jax.tree.leaves(checkpoint.params))
  assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no staging directories left


def test_failed_save_leaves_nothing(b0_params, tmp_path, monkeypatch):
  def broken_save(self, directory, *args, **kwargs):
    os.makedirs(directory)
    with open(os.path.join(directory, "half_written"), "w") as f:
      f.write("partial")
    raise OSError("disk full")

  monkeypatch.setattr(store.ocp.Checkpointer, "save", broken_save)
  with pytest.raises(OSError, match="disk full"):
    save_converted(tmp_path / "ckpt", b0_params, METADATA)
  assert os.listdir(tmp_path) == []


def test_save_refuses_existing_directory_and_incomplete_metadata(b0_params, tmp_path):
  with pytest.raises(CheckpointError, match="metadata lacks source_sha256"):
    save_converted(tmp_path / "a", b0_params, {k: v for k, v in METADATA.items()
                                                 if k != "source_sha256"})
  (tmp_path / "b").mkdir()
  with pytest.raises(CheckpointError, match="already exists"):
    save_converted(tmp_path / "b", b0_params, METADATA)


def test_load_converted_rejects_other_directories(tmp_path):
  with pytest.raises(CheckpointError, match="not a converted pvt_jax checkpoint"):
    load_converted(tmp_path)


def test_replace_head(b0_params):
  assert replace_head(b0_params, 1000) is b0_params
  assert "head" not in replace_head(b0_params, 0)
  new = replace_head(b0_params, 7, jax.random.key(3))
  assert new["head"]["kernel"].shape == (256, 7)
  np.testing.assert_array_equal(new["head"]["bias"], np.zeros(7))
  jax.tree.map(np.testing.assert_array_equal, new["head"],
               replace_head(replace_head(b0_params, 0), 7, jax.random.key(3))["head"])
  flat_old, flat_new = (traverse_util.flatten_dict(p) for p in (b0_params, new))
  for path, value in flat_old.items():
    if path[0] != "head":
      assert flat_new[path] is value
  # A given head (e.g. the model's own initialisation) instead of a fresh one; keep=False
  # replaces even a head of the right size.
  own = {"kernel": np.ones((256, 1000), np.float32), "bias": np.ones(1000, np.float32)}
  assert replace_head(b0_params, 1000, keep=False, new_head=own)["head"] is own
  assert replace_head(b0_params, 1000, new_head=own)["head"] is b0_params["head"]


def test_load_pretrained_reads_pytorch_files_directly(tmp_path):
  rng = np.random.default_rng(1)
  state = {key: rng.standard_normal(shape, dtype=np.float32)
           for key, shape in table_shapes("b0", "timm").items()}
  source = save(tmp_path / "model.safetensors", state)
  model, variables = load_pretrained(source, num_classes=5)
  assert model.num_classes == 5 and variables["params"]["head"]["kernel"].shape == (256, 5)
  np.testing.assert_array_equal(variables["params"]["stage4"]["norm"]["scale"],
                                state["stages.3.norm.weight"])
  with pytest.raises(CheckpointError, match="no such file"):
    load_pretrained(tmp_path / "absent.pth")
