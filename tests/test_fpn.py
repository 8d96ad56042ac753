"""pvt_jax.models.fpn against PyTorch's F.interpolate and the real mmseg / mmdet FPN modules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from openmmlab_reference import flax_variables, mmdet_necks, mmseg_models, nchw, nhwc, randomize_

from pvt_jax.models.fpn import FPN, resize_bilinear, resize_nearest

TOLERANCE = 1e-4
B2_WIDTHS = [64, 128, 320, 512]
# Stage-map sizes of a 200x296 input (odd sides, 2x upsampling does not fit) and of 256x256.
ODD_MAPS = [(50, 74), (25, 37), (13, 19), (7, 10)]
SQUARE_MAPS = [(64, 64), (32, 32), (16, 16), (8, 8)]


def random_maps(sizes, widths, seed):
  rng = np.random.default_rng(seed)
  return [rng.standard_normal((2, h, w, c), np.float32) for (h, w), c in zip(sizes, widths,
                                                                              strict=True)]


@pytest.mark.parametrize("in_size,out_size", [((7, 10), (13, 19)), ((13, 19), (25, 37)),
                                               ((8, 8), (16, 16)), ((5, 9), (5, 4)),
                                               ((50, 74), (200, 296)), ((3, 3), (7, 2))])
def test_resizes_equal_torch_interpolate(in_size, out_size):
  x = np.random.default_rng(0).standard_normal((2, *in_size, 3), np.float32)
  nearest = F.interpolate(nchw(x), size=out_size, mode="nearest")
  np.testing.assert_array_equal(np.asarray(resize_nearest(jnp.asarray(x), out_size)),
                                nhwc(nearest))
  for align_corners in (False, True):
    bilinear = F.interpolate(nchw(x), size=out_size, mode="bilinear",
                             align_corners=align_corners)
    ours = resize_bilinear(jnp.asarray(x), out_size, align_corners=align_corners)
    np.testing.assert_allclose(np.asarray(ours), nhwc(bilinear), atol=1e-6, rtol=0)


def _compare(reference, ours, maps):
  reference = randomize_(reference, seed=1).eval()
  with torch.no_grad():
    expected = [nhwc(out) for out in reference([nchw(m) for m in maps])]
  variables = flax_variables(reference.state_dict())
  outputs = jax.jit(lambda v, x: ours.apply({"params": v}, x))(variables["params"], maps)
  assert len(outputs) == len(expected)
  worst = 0.0
  for out, ref in zip(outputs, expected, strict=True):
    assert out.shape == ref.shape
    assert np.abs(ref).mean() > 0.1  # random weights keep every level O(1): a real comparison
    worst = max(worst, float(np.max(np.abs(np.asarray(out) - ref))))
  assert worst <= TOLERANCE
  return worst


MMSEG_CASES = {
    "semantic_fpn": dict(num_outs=4),
    "pool_extra": dict(num_outs=6),
    "on_lateral_relu": dict(num_outs=6, add_extra_convs="on_lateral",
                            relu_before_extra_convs=True),
    "on_output_from_1": dict(num_outs=5, start_level=1, add_extra_convs="on_output"),
    "end_level": dict(num_outs=2, start_level=1, end_level=3),
}


@pytest.mark.torch
@pytest.mark.parametrize("case", list(MMSEG_CASES))
@pytest.mark.parametrize("sizes", [SQUARE_MAPS, ODD_MAPS], ids=["square", "odd"])
def test_fpn_equals_mmseg(case, sizes):
  kwargs = MMSEG_CASES[case]
  reference = mmseg_models().necks.FPN(B2_WIDTHS, 32, **kwargs)
  _compare(reference, FPN(32, **kwargs), random_maps(sizes, B2_WIDTHS, seed=2))


@pytest.mark.torch
@pytest.mark.parametrize("sizes", [SQUARE_MAPS, ODD_MAPS], ids=["square", "odd"])
def test_fpn_equals_mmdet_retinanet_neck(sizes):
  """The official RetinaNet configs' neck: start_level 1, extra convs on the input, 5 outputs."""
  kwargs = dict(start_level=1, add_extra_convs="on_input", num_outs=5)
  reference = mmdet_necks().FPN(B2_WIDTHS, 256, **kwargs)
  _compare(reference, FPN(256, **kwargs), random_maps(sizes, B2_WIDTHS, seed=3))


def test_fpn_parameter_names_and_xavier_init():
  maps = random_maps(SQUARE_MAPS, B2_WIDTHS, seed=0)
  params = FPN(256, num_outs=5, start_level=1, add_extra_convs="on_input").init(
      jax.random.key(0), maps)["params"]
  assert sorted(params) == ["fpn_convs_0", "fpn_convs_1", "fpn_convs_2", "fpn_convs_3",
                            "fpn_convs_4", "lateral_convs_0", "lateral_convs_1",
                            "lateral_convs_2"]
  assert params["fpn_convs_3"]["conv"]["kernel"].shape == (3, 3, 512, 256)  # 'on_input'
  kernel = np.asarray(params["fpn_convs_0"]["conv"]["kernel"])
  bound = np.sqrt(6.0 / (9 * 256 + 9 * 256))  # Xavier uniform, fan_in = fan_out = 3*3*256
  assert kernel.max() <= bound and kernel.min() >= -bound
  np.testing.assert_allclose(kernel.std(), bound / np.sqrt(3), rtol=0.01)  # uniform's std
  assert not np.asarray(params["fpn_convs_0"]["conv"]["bias"]).any()


@pytest.mark.parametrize("kwargs,match", [
    (dict(add_extra_convs=True, num_outs=5), "True means"),
    (dict(add_extra_convs="on_top", num_outs=5), "on_top"),
    (dict(num_outs=3), "num_outs=3"),
    (dict(num_outs=2, end_level=3), "end_level=3"),
])
def test_fpn_rejects_bad_arguments(kwargs, match):
  maps = random_maps(SQUARE_MAPS, B2_WIDTHS, seed=0)
  with pytest.raises(ValueError, match=match):
    FPN(8, **kwargs).init(jax.random.key(0), maps)
