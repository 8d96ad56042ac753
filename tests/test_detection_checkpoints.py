"""mmdet-layout RetinaNet checkpoints: the whole network against timm's PVT v2 + mmdet's FPN and
RetinaHead with the same random weights (per-level outputs), `python -m pvt_jax.convert` from an
mmdet training checkpoint and `--export=mmdet` back exactly, ImageNet init of the backbone, and
one-line errors."""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from openmmlab_reference import nchw, nhwc, randomize_  # noqa: E402
from test_convert import run_convert  # noqa: E402
from test_detection_mmdet import _mmdet  # noqa: E402
from torch_reference import random_timm_model, save, state_dict_in  # noqa: E402

from pvt_jax.checkpoints import (  # noqa: E402
    load_converted,
    load_pretrained,
    read_state_dict,
    with_backbone,
)
from pvt_jax.models import VARIANTS  # noqa: E402
from pvt_jax.models.retinanet import RetinaNet  # noqa: E402

pytestmark = pytest.mark.torch
NUM_CLASSES = 6


def mmdet_reference(variant, seed):
  """timm's PVT v2 and mmdet's FPN + RetinaHead as the official config builds them, every
  weight random."""
  _mmdet()
  from mmdet.registry import MODELS
  backbone = random_timm_model(variant, num_classes=0, seed=seed)
  neck = MODELS.build(dict(type="FPN", in_channels=list(VARIANTS[variant].embed_dims),
                           out_channels=256, start_level=1, add_extra_convs="on_input",
                           num_outs=5))
  head = MODELS.build(dict(
      type="RetinaHead", num_classes=NUM_CLASSES, in_channels=256, stacked_convs=4,
      feat_channels=256,
      anchor_generator=dict(type="AnchorGenerator", octave_base_scale=4, scales_per_octave=3,
                            ratios=[0.5, 1.0, 2.0], strides=[8, 16, 32, 64, 128])))
  return backbone, randomize_(neck, seed + 1).eval(), randomize_(head, seed + 2).eval()


def mmdet_state_dict(reference, variant) -> dict:
  """What mmdet's RetinaNet.state_dict() holds: backbone.* (official PVT v2 names), neck.*,
  bbox_head.*."""
  backbone, neck, head = reference
  state = {f"backbone.{k}": v for k, v in state_dict_in("official", backbone, variant).items()}
  for prefix, module in (("neck", neck), ("bbox_head", head)):
    state.update({f"{prefix}.{k}": v.numpy().copy() for k, v in module.state_dict().items()})
  return state


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """An mmdet 2.x training checkpoint of B0 RetinaNet ({'meta', 'state_dict', 'optimizer'}),
  converted with the CLI."""
  reference = mmdet_reference("b0", seed=3)
  directory = tmp_path_factory.mktemp("mmdet")
  path = directory / "retinanet_pvt_v2_b0_fpn_1x_coco.pth"
  state = mmdet_state_dict(reference, "b0")
  meta = {"mmdet_version": "2.13.0", "CLASSES": tuple(f"c{i}" for i in range(NUM_CLASSES)),
          "epoch": 12}
  torch.save({"meta": meta, "state_dict": {k: torch.from_numpy(v) for k, v in state.items()},
              "optimizer": {"state": {}, "param_groups": [{"lr": 1e-6}]}}, path)
  output = directory / "converted"
  assert run_convert(f"--input={path}", f"--output={output}") == 0
  return reference, state, path, output


@pytest.mark.slow
@pytest.mark.parametrize("size", [(256, 320), (200, 296)])
def test_converted_network_matches_timm_and_mmdet(checkpoint, size):
  reference, _, _, output = checkpoint
  backbone, neck, head = reference
  model, variables = load_pretrained(str(output))
  assert isinstance(model, RetinaNet) and model.num_classes == NUM_CLASSES
  images = np.random.default_rng(0).normal(size=(2, *size, 3)).astype(np.float32)
  with torch.no_grad():
    _, maps = backbone.forward_intermediates(nchw(images))
    want_cls, want_box = head(neck(maps))
  got_cls, got_box = jax.jit(model.apply)(variables, images)
  for got, want in zip(got_cls + got_box, list(want_cls) + list(want_box), strict=True):
    want = nhwc(want)
    assert got.shape == want.shape
    worst = float(np.abs(np.asarray(got) - want).max())
    assert worst <= 1e-4, worst


def test_conversion_metadata_export_and_errors(checkpoint, tmp_path, capsys):
  _, state, path, output = checkpoint
  converted = load_converted(str(output))
  assert converted.task == "detection"
  assert (converted.metadata["variant"], converted.metadata["num_classes"],
          converted.metadata["source_format"]) == ("b0", NUM_CLASSES, "mmdet")
  np.testing.assert_array_equal(
      converted.params["bbox_head"]["retina_cls"]["kernel"],
      state["bbox_head.retina_cls.weight"].transpose(2, 3, 1, 0))
  exported = tmp_path / "back.pth"
  assert run_convert("--export=mmdet", f"--input={output}", f"--output={exported}") == 0
  back = read_state_dict(exported)
  assert sorted(back) == sorted(state)
  for key, value in state.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)

  capsys.readouterr()
  assert run_convert(f"--input={path}", f"--output={tmp_path / 'wrong'}", "--variant=b1") == 1
  assert "error:" in capsys.readouterr().err
  broken = dict(state)
  del broken["bbox_head.reg_convs.2.conv.bias"]
  save(tmp_path / "broken.pth", broken)
  assert run_convert(f"--input={tmp_path / 'broken.pth'}", f"--output={tmp_path / 'x'}") == 1
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "missing key bbox_head.reg_convs.2.conv.bias" in err
  assert not (tmp_path / "x").exists()
  assert run_convert("--export=official", f"--input={output}", f"--output={tmp_path / 'o.pth'}"
                     ) == 1
  assert "exports to mmdet" in capsys.readouterr().err


def test_imagenet_backbone_initialises_the_detector(tmp_path):
  """A converted classification checkpoint fills the detector's backbone (its head dropped)."""
  classifier = random_timm_model("b0", num_classes=1000, seed=7)
  path = save(tmp_path / "pvt_v2_b0.pth", state_dict_in("official", classifier, "b0"))
  assert run_convert(f"--input={path}", f"--output={tmp_path / 'b0'}") == 0
  model = RetinaNet("b0", 80)
  params = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 64, 64, 3)))["params"]
  params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), params)
  filled = with_backbone(params, load_converted(str(tmp_path / "b0")), "b0")
  kernel = filled["backbone"]["stage1"]["patch_embed"]["proj"]["kernel"]
  want = classifier.state_dict()["patch_embed.proj.weight"].numpy().transpose(2, 3, 1, 0)
  np.testing.assert_array_equal(kernel, want)
  assert "head" not in filled["backbone"] and not filled["bbox_head"]["retina_cls"]["bias"].any()
