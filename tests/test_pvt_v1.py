"""PVT v1 as our model's v1 switches: parameter counts, parity with a PyTorch PVT v1 written from
the official `classification/pvt.py` (tests/pvt_v1_reference.py; timm has none), the position
embedding resize, and the official checkpoint layout converting through `pvt_jax.convert`."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
from absl import flags
from pvt_v1_reference import (
  DEPTHS,
  PyramidVisionTransformer,
  random_model,
  resize_position_embedding,
)
from torch_reference import save

from pvt_jax import convert
from pvt_jax.checkpoints import (
  convert_state_dict,
  export_state_dict,
  load_converted,
  load_pretrained,
  read_state_dict,
)
from pvt_jax.models import VARIANTS, Variant, create_model, ops

pytestmark = pytest.mark.torch

TOLERANCE = 5e-5
# PVT v1 paper, Table 2 (millions of parameters, 1000-class head).
PAPER_PARAMS = {"v1_tiny": 13.2, "v1_small": 24.5, "v1_medium": 44.2, "v1_large": 61.4}


def count(tree):
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def official_shapes(variant, num_classes=1000):
  """The official state dict's shapes, built from the reference without allocating it."""
  with torch.device("meta"):
    model = PyramidVisionTransformer(DEPTHS[variant], num_classes)
  return {key: tuple(value.shape) for key, value in model.state_dict().items()}


@pytest.mark.parametrize("variant", sorted(PAPER_PARAMS))
def test_parameter_counts_are_the_official_checkpoints(variant):
  shapes = official_shapes(variant)
  assert round(sum(math.prod(s) for s in shapes.values()) / 1e6, 1) == PAPER_PARAMS[variant]
  ours = jax.eval_shape(create_model(variant).init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  assert count(ours) == sum(math.prod(s) for s in shapes.values())
  assert VARIANTS[variant].official.params == count(ours)


def test_ablation_ope_row_is_b2_without_depthwise_convs():
  b2, ope = VARIANTS["b2"], VARIANTS["v1_small_ope"]
  dwconvs = sum(d * r * 10 * n for d, r, n in zip(b2.embed_dims, b2.mlp_ratios, b2.depths,
                                                  strict=True))  # 3x3 kernel + bias per channel
  assert ope.official.params == b2.official.params - dwconvs


@pytest.mark.parametrize("grid,size", [(7, (7, 7)), (56, (50, 38)), (14, (17, 23)), (7, (1, 2)),
                                       (7, (40, 9))])
def test_position_embedding_resize_is_torch_bilinear(grid, size):
  table = np.random.default_rng(grid).standard_normal((1, grid * grid, 24), np.float32)
  expected = F.interpolate(torch.from_numpy(table).reshape(1, grid, grid, 24).permute(0, 3, 1, 2),
                           size=size, mode="bilinear").permute(0, 2, 3, 1)[0].numpy()
  ours = ops.bilinear_resize(jnp.asarray(table[0].reshape(grid, grid, 24)), size)
  np.testing.assert_allclose(ours, expected, rtol=0, atol=5e-6)  # float32 rounding
  # The reference's resize is the official one (a table on its own grid is kept as it is).
  reference = resize_position_embedding(torch.from_numpy(table), grid, *size)[0].numpy()
  np.testing.assert_allclose(reference.reshape(*size, 24), expected, rtol=0, atol=0)


def _outputs(reference, images):
  with torch.no_grad():
    x = torch.from_numpy(images.transpose(0, 3, 1, 2))
    return reference(x).numpy(), [m.numpy().transpose(0, 2, 3, 1) for m in
                                  reference.stage_maps(x)]


@pytest.mark.slow
@pytest.mark.parametrize("variant,sizes", [
    ("v1_tiny", [(2, 224, 224), (2, 200, 152)]),
    ("v1_small", [(1, 136, 200)]),
])
def test_logits_and_stage_maps_match_the_reference(variant, sizes):
  reference = random_model(variant, seed=len(variant))
  conversion = convert_state_dict({k: v.numpy() for k, v in reference.state_dict().items()})
  assert (conversion.variant, conversion.num_classes) == (variant, 1000)
  model = create_model(variant)
  logits_fn = jax.jit(model.apply)
  maps_fn = jax.jit(lambda v, x: model.apply(v, x, method="features"))
  rng = np.random.default_rng(0)
  for batch, height, width in sizes:
    images = rng.standard_normal((batch, height, width, 3), np.float32)
    expected_logits, expected_maps = _outputs(reference, images)
    assert np.abs(expected_logits).max() > 0.1
    diffs = [np.abs(np.asarray(logits_fn(conversion.variables, images)) - expected_logits).max()]
    maps = maps_fn(conversion.variables, images)
    diffs += [np.abs(np.asarray(ours) - theirs).max()
              for ours, theirs in zip(maps, expected_maps, strict=True)]
    print(f"{variant} {height}x{width}: max |diff| logits, maps {diffs}")
    assert max(diffs) <= TOLERANCE, diffs


def test_detected_from_official_shapes():
  for variant in DEPTHS:
    state = {k: np.zeros(s, np.float32) for k, s in official_shapes(variant, 0).items()}
    conversion = convert_state_dict(state)
    assert (conversion.variant, conversion.num_classes) == (variant, 0)


def run_convert(*args):
  flag_values = flags.FlagValues()
  convert.define_flags(flag_values)
  flag_values(["convert", *args])
  return convert.run(flag_values)


@pytest.mark.slow
@pytest.mark.parametrize("filename", ["pvt_tiny.pth", "pvt_tiny.safetensors"])
def test_official_v1_checkpoint_converts_and_exports_back_exactly(filename, tmp_path, capsys):
  reference = random_model("v1_tiny", seed=3)
  state = {k: v.numpy() for k, v in reference.state_dict().items()}
  # The official release files are raw state dicts; its training checkpoints wrap them in 'model'.
  source = save(tmp_path / filename, state, wrap="model" if filename.endswith(".pth") else None)
  output = tmp_path / "converted"
  assert run_convert(f"--input={source}", f"--output={output}") == 0
  assert "pvt_v1_tiny, 1000 classes" in capsys.readouterr().out
  assert load_converted(output).metadata["variant"] == "v1_tiny"

  model, variables = load_pretrained(output)
  images = np.random.default_rng(1).standard_normal((1, 96, 64, 3), np.float32)
  expected, _ = _outputs(reference, images)
  assert np.abs(np.asarray(jax.jit(model.apply)(variables, images)) - expected).max() <= TOLERANCE

  exported = tmp_path / f"exported{source.suffix}"
  assert run_convert("--export=official", f"--input={output}", f"--output={exported}") == 0
  back = read_state_dict(exported)
  assert sorted(back) == sorted(state)
  for key, value in state.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_v1_has_only_the_official_layout(tmp_path, capsys):
  state = {k: np.zeros(s, np.float32) for k, s in official_shapes("v1_tiny", 0).items()}
  source = save(tmp_path / "pvt_tiny.safetensors", state)
  assert run_convert(f"--input={source}", f"--output={tmp_path / 'a'}", "--verify") == 1
  assert "--verify compares with timm, which has no pvt_v1_tiny" in capsys.readouterr().err
  assert not (tmp_path / "a").exists()
  assert run_convert(f"--input={source}", f"--output={tmp_path / 'b'}") == 0
  target = tmp_path / "timm.safetensors"
  assert run_convert("--export=timm", f"--input={tmp_path / 'b'}", f"--output={target}") == 1
  error = capsys.readouterr().err.strip()
  assert error == ("error: the timm layout has no PVT v1 keys (such as pos_embed1); export PVT v1 "
                   "in the official layout")
  assert not target.exists()


SWITCHES = ("overlapping_patches", "position_embedding", "conv_ffn", "linear")


@pytest.mark.slow
def test_every_switch_combination_builds_trains_and_converts(monkeypatch):
  """All 16 settings of the four switches, at tiny widths: one AdamW step (eagerly: the combos
  share their ops' compilations, where 16 jitted steps would each compile anew), every
  parameter with a gradient, and the official state dict converting back to the same params."""
  images = np.random.default_rng(1).standard_normal((2, 64, 48, 3), np.float32)
  tx = optax.adamw(1e-3)
  for switches in itertools.product((False, True), repeat=4):
    variant = Variant((16, 32, 80, 128), (1, 1, 1, 1), (4, 4, 4, 4), VARIANTS["b0"].official,
                      **dict(zip(SWITCHES, switches, strict=True)))
    name = "combo_" + "".join("01"[x] for x in switches)
    monkeypatch.setitem(VARIANTS, name, variant)  # a named variant, as conversion detects them
    model = create_model(name, num_classes=10, drop_path_rate=0.1, drop_rate=0.1)
    shapes = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s, rng=rng: jnp.asarray(rng.normal(0, 0.1, s.shape), s.dtype),
                          shapes)

    def loss(p, model=model):
      logits = model.apply({"params": p}, images, train=True, rngs={"dropout": jax.random.key(2)})
      return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.array([1, 7])).mean()

    value, grads = jax.value_and_grad(loss)(params)
    updates, _ = tx.update(grads, tx.init(params), params)
    params = optax.apply_updates(params, updates)
    assert np.isfinite(value), name
    assert all(np.abs(g).max() > 0 for g in jax.tree.leaves(grads)), name  # all are used

    state = export_state_dict(params, "official")
    assert ("pos_embed1" in state, "cls_token" in state) == (
        variant.position_embedding, variant.class_token), name
    assert ("block1.0.mlp.dwconv.dwconv.weight" in state) == variant.conv_ffn, name
    assert state["patch_embed1.proj.weight"].shape[2] == (7 if variant.overlapping_patches else 4)
    conversion = convert_state_dict(state)
    assert conversion.variant == name
    jax.tree.map(np.testing.assert_array_equal, conversion.params,
                 jax.tree.map(np.asarray, params))
