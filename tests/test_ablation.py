"""Table 6 as configs (one per row), PVT v1 configs, and the ablation report's numbers."""

import importlib

import pytest

from pvt_jax import ablation
from pvt_jax.models import VARIANTS, retinanet


def load(name, arg=None):
  return importlib.import_module(f"configs.{name}").get_config(arg)


def test_table6_rows_are_the_switches():
  rows = {row: VARIANTS[load("ablation", f"{row},imagenet").variant] for row in
          ("v1_small", "ope", "cffn", "lsra")}
  switches = {row: (v.overlapping_patches, v.conv_ffn, v.linear, v.position_embedding)
              for row, v in rows.items()}
  assert switches == {"v1_small": (False, False, False, True), "ope": (True, False, False, False),
                      "cffn": (True, True, False, False), "lsra": (True, True, True, False)}
  assert {v.depths for v in rows.values()} == {(3, 4, 6, 3)}
  assert load("ablation", "ope").dataset == "fashion_mnist"  # the quick default, as elsewhere
  with pytest.raises(ValueError, match="unknown Table 6 row 'b2'"):
    load("ablation", "b2")


@pytest.mark.parametrize("size,drop_path,clip", [("tiny", 0.1, 0.0), ("small", 0.1, 0.0),
                                                 ("medium", 0.3, 1.0), ("large", 0.3, 1.0)])
def test_pvt_v1_configs_are_the_official_recipe(size, drop_path, clip):
  c = load("pvt_v1", f"{size},imagenet")
  assert (c.variant, c.drop_path_rate, c.optimizer.grad_clip_norm) == (f"v1_{size}", drop_path,
                                                                        clip)
  assert (c.dataset, c.image_size, c.num_epochs) == ("imagenet2012", 224, 300)
  assert load("pvt_v1", "imagenet").variant == "v1_small"
  with pytest.raises(ValueError, match="unknown PVT v1 size 'huge'"):
    load("pvt_v1", "huge")


def test_growth_reads_the_exponent_of_the_pixels():
  quadratic = ablation.growth({224: 1.0, 448: 16.0, 896: 256.0})  # cost ~ pixels^2
  assert quadratic["ratio"] == 256.0 and quadratic["slope"] == pytest.approx(4.0)
  assert ablation.growth({224: 2.0, 448: 8.0})["slope"] == pytest.approx(2.0)


@pytest.mark.slow
def test_classification_gmacs_and_figure4_order():
  assert ablation.forward_gmacs("b2") == pytest.approx(VARIANTS["b2"].official.gmacs, rel=0.03)
  assert ablation.forward_gmacs("v1_small") == pytest.approx(3.8, rel=0.05)
  curves = ablation.figure4(sizes=(224, 448))
  slopes = [curves[v]["growth"]["slope"] for v in ("v1_small", "b2", "b2_li")]
  assert slopes[0] > slopes[1] > slopes[2]  # the paper: v1-Small grows fastest, B2-Li slowest


@pytest.mark.slow
def test_retinanet_parameters_are_table6s():
  for _, variant, _, paper_params, _ in ablation.TABLE6:
    assert round(retinanet.num_params(variant) / 1e6, 1) == paper_params, variant


@pytest.mark.slow
def test_v1_small_retinanet_gflops_are_table6s():
  assert retinanet.forward_gflops("v1_small") == pytest.approx(285.8, rel=0.01)
  assert retinanet.forward_gflops("v1_small_ope") == pytest.approx(288.6, rel=0.01)
