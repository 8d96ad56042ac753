"""mmseg-layout Semantic FPN checkpoints: `python -m pvt_jax.convert` detects and converts them
(params + BN statistics), `--export=mmseg` writes them back exactly, bad input gets one line; a
classification checkpoint initialises the backbone."""

import re

import jax
import numpy as np
import pytest
import torch
from absl import flags
from openmmlab_reference import flax_variables
from test_semantic_fpn import mmseg_reference, reference_logits
from torch_reference import save, state_dict_in

from pvt_jax import convert
from pvt_jax.checkpoints import (
    CheckpointError,
    load_converted,
    load_pretrained,
    read_state_dict,
    with_backbone,
    write_state_dict,
)
from pvt_jax.models.semantic_fpn import create_semantic_fpn, init_shapes

NUM_CLASSES = 19


def run_convert(*args):
  flag_values = flags.FlagValues()
  convert.define_flags(flag_values)
  flag_values(["convert", *args])
  return convert.run(flag_values)


@pytest.fixture(scope="module")
def reference():
  return mmseg_reference("b0", NUM_CLASSES, seed=5)


def mmseg_state_dict(reference) -> dict:
  """What mmseg's EncoderDecoder.state_dict() holds: backbone (official PVT v2 names, as the
  PVTv2-Seg backbone), neck.*, decode_head.* with the real mmseg module names."""
  backbone, neck, head = reference
  state = {f"backbone.{k}": v for k, v in state_dict_in("official", backbone, "b0").items()}
  for prefix, module in (("neck", neck), ("decode_head", head)):
    state.update({f"{prefix}.{k}": v.numpy().copy() for k, v in module.state_dict().items()})
  return state


@pytest.fixture(scope="module")
def mmseg_file(reference, tmp_path_factory):
  """An mmseg training checkpoint: {'meta', 'state_dict', 'optimizer'} as mmseg saves it."""
  path = tmp_path_factory.mktemp("mmseg") / "fpn_pvtv2_b0.pth"
  tensors = {k: torch.from_numpy(v) for k, v in mmseg_state_dict(reference).items()}
  meta = {"mmseg_version": "0.13.0", "CLASSES": tuple(f"c{i}" for i in range(NUM_CLASSES)),
          "PALETTE": [[i, i, i] for i in range(NUM_CLASSES)], "iter": 40000}
  torch.save({"meta": meta, "state_dict": tensors,
              "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]}}, path)
  return path


@pytest.fixture(scope="module")
def converted(mmseg_file):
  output = mmseg_file.parent / "converted"
  assert run_convert(f"--input={mmseg_file}", f"--output={output}") == 0
  return output


@pytest.mark.torch
def test_mmseg_checkpoint_converts_to_the_reference_variables(converted, reference, mmseg_file):
  checkpoint = load_converted(converted)
  assert checkpoint.task == "segmentation"
  assert (checkpoint.metadata["variant"], checkpoint.metadata["num_classes"],
          checkpoint.metadata["source_format"]) == ("b0", NUM_CLASSES, "mmseg")
  backbone, neck, head = reference
  expected_neck = flax_variables(neck.state_dict())["params"]
  expected_head = flax_variables(head.state_dict())
  jax.tree.map(np.testing.assert_array_equal, checkpoint.params["neck"], expected_neck)
  jax.tree.map(np.testing.assert_array_equal, checkpoint.params["decode_head"],
               expected_head["params"])
  jax.tree.map(np.testing.assert_array_equal, checkpoint.batch_stats["decode_head"],
               expected_head["batch_stats"])
  shapes = init_shapes(create_semantic_fpn("b0", NUM_CLASSES))
  assert jax.tree.structure(checkpoint.variables) == jax.tree.structure(shapes)


@pytest.mark.torch
def test_converted_checkpoint_gives_mmseg_logits(converted, reference):
  model, variables = load_pretrained(converted)
  images = np.random.default_rng(1).standard_normal((1, 72, 104, 3), np.float32)
  logits = jax.jit(model.apply)(variables, images)
  expected = reference_logits(reference, images)
  assert np.abs(expected).mean() > 0.3
  assert np.max(np.abs(np.asarray(logits) - expected)) <= 1e-4


@pytest.mark.torch
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_export_round_trip_is_exact(converted, reference, tmp_path, suffix):
  output = tmp_path / f"exported{suffix}"
  assert run_convert("--export=mmseg", f"--input={converted}", f"--output={output}") == 0
  exported, original = read_state_dict(output), mmseg_state_dict(reference)
  assert sorted(exported) == sorted(original)
  for key, value in original.items():
    assert (exported[key].dtype, exported[key].shape) == (value.dtype, value.shape), key
    np.testing.assert_array_equal(exported[key], value, err_msg=key)
  assert int(exported["decode_head.scale_heads.3.4.bn.num_batches_tracked"]) == 1234


@pytest.mark.torch
def test_raw_safetensors_state_dict_converts_too(reference, tmp_path):
  source = tmp_path / "fpn.safetensors"
  write_state_dict(source, mmseg_state_dict(reference))  # keeps the 0-d counters 0-d
  model, variables = load_pretrained(source)
  assert model.num_classes == NUM_CLASSES and model.variant == "b0"
  assert "batch_stats" in variables


def broken(reference, change):
  state = mmseg_state_dict(reference)
  change(state)
  return state


BAD_INPUTS = {
    "missing": (lambda s: s.pop("neck.fpn_convs.2.conv.bias"),
                "missing key neck.fpn_convs.2.conv.bias for mmseg segmentation pvt_v2_b0"),
    "unexpected": (lambda s: s.update({"auxiliary_head.conv_seg.weight": np.zeros(3, "f")}),
                   "unexpected key auxiliary_head.conv_seg.weight"),
    "shape": (lambda s: s.update({"decode_head.scale_heads.1.0.bn.running_var": np.ones(7, "f")}),
              r"decode_head.scale_heads.1.0.bn.running_var has shape \[7\]"),
    "counter": (lambda s: s.pop("decode_head.scale_heads.2.2.bn.num_batches_tracked"),
                "missing key decode_head.scale_heads.2.2.bn.num_batches_tracked"),
    "counter_dtype": (lambda s: s.update({"decode_head.scale_heads.0.0.bn.num_batches_tracked":
                                          np.zeros((), "f")}), "expected an integer scalar"),
    "backbone": (lambda s: s.pop("backbone.block2.1.mlp.fc2.weight"),
                 "missing key backbone.block2.1.mlp.fc2.weight"),
}


@pytest.mark.torch
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_checkpoints_fail_with_one_line_naming_the_key(case, reference, tmp_path, capsys):
  change, message = BAD_INPUTS[case]
  source = tmp_path / "bad.safetensors"
  write_state_dict(source, broken(reference, change))
  assert run_convert(f"--input={source}", f"--output={tmp_path / 'out'}") == 1
  error = capsys.readouterr().err
  assert error.count("\n") == 1 and error.startswith(f"error: {source}: ")
  assert re.search(message, error), error
  assert not (tmp_path / "out").exists()


@pytest.mark.torch
def test_wrong_variant_and_class_count_are_refused(mmseg_file, tmp_path, capsys):
  assert run_convert(f"--input={mmseg_file}", f"--output={tmp_path / 'a'}", "--variant=b1") == 1
  assert "the backbone is pvt_v2_b0" in capsys.readouterr().err
  assert run_convert(f"--input={mmseg_file}", f"--output={tmp_path / 'b'}",
                     "--num_classes=150") == 1
  assert f"keeps its {NUM_CLASSES} classes" in capsys.readouterr().err
  assert not any(tmp_path.iterdir())


@pytest.mark.torch
def test_export_layout_must_fit_the_task(converted, tmp_path, capsys):
  assert run_convert("--export=timm", f"--input={converted}", f"--output={tmp_path / 'x.pth'}") == 1
  assert "a segmentation checkpoint exports to mmseg, not timm" in capsys.readouterr().err


@pytest.mark.torch
def test_backbone_comes_from_a_classification_checkpoint(reference, tmp_path, capsys):
  backbone = reference[0]
  source = save(tmp_path / "pvt_v2_b0.safetensors", state_dict_in("official", backbone, "b0"))
  assert run_convert(f"--input={source}", f"--output={tmp_path / 'b0'}") == 0
  checkpoint = load_converted(tmp_path / "b0")
  assert checkpoint.task == "classification"
  model = create_semantic_fpn("b0", NUM_CLASSES)
  params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), init_shapes(model)["params"])
  initialised = with_backbone(params, checkpoint, "b0")
  jax.tree.map(np.testing.assert_array_equal, initialised["backbone"],
               {k: v for k, v in checkpoint.params.items() if k != "head"})
  jax.tree.map(np.testing.assert_array_equal, initialised["neck"], params["neck"])
  with pytest.raises(CheckpointError, match="init_from holds pvt_v2_b0, the model is pvt_v2_b2"):
    with_backbone(params, checkpoint, "b2")
  # A classification checkpoint does not export as a segmentation one.
  assert run_convert("--export=mmseg", f"--input={tmp_path / 'b0'}",
                     f"--output={tmp_path / 'x.pth'}") == 1
  assert "a classification checkpoint cannot be exported in the mmseg" in capsys.readouterr().err
