"""End to end: timm PVT v2 (random weights, every variant) saved in the official, timm and HF
layouts -> `python -m pvt_jax.convert` -> `load_pretrained` gives timm's logits and stage maps."""

import contextlib
import math

import jax
import numpy as np
import pytest
import torch
from absl import flags
from torch_reference import random_timm_model, save, state_dict_in, timm_outputs

from pvt_jax import convert, cpu
from pvt_jax.checkpoints import convert_state_dict, load_converted, load_pretrained
from pvt_jax.checkpoints.verify import forward_with_stage_maps
from pvt_jax.models import V2_VARIANTS, VARIANTS, create_model

TOLERANCE = 5e-5
# Every variant also runs at a non-square size, not a multiple of 32, whose maps have odd sides
# (50x74 ... 7x10 for the small variants; 34x50 ... 5x7 at batch 1 for the deep ones, to keep the
# file fast on two CPU cores).
DEEP = [(1, 224, 224), (1, 136, 200)]
SIZES = {"b0": [(2, 224, 224), (2, 200, 296)], "b1": [(2, 224, 224), (2, 200, 296)],
         "b2_li": [(2, 224, 224), (2, 200, 296)], "b2": DEEP, "b3": DEEP, "b4": DEEP, "b5": DEEP}
FILES = {"official": "pvt_v2.pth", "timm": "model.safetensors", "hf": "hf_model.safetensors"}


def run_convert(*args):
  flag_values = flags.FlagValues()
  convert.define_flags(flag_values)
  flag_values(["convert", *args])
  return convert.run(flag_values)


def max_diff(ours, theirs):
  assert ours.shape == theirs.shape
  return float(np.max(np.abs(np.asarray(ours) - theirs)))


@pytest.mark.parametrize("variant", V2_VARIANTS)
def test_all_layouts_convert_to_timm_numerics(variant, tmp_path):
  reference = random_timm_model(variant, seed=sum(map(ord, variant)))
  converted = {}
  for layout, filename in FILES.items():
    # Official release files are raw state dicts; its training checkpoints wrap them in 'model'.
    source = save(tmp_path / filename, state_dict_in(layout, reference, variant),
                  wrap="model" if layout == "official" and variant == "b2" else None)
    output = tmp_path / f"converted_{layout}"
    assert run_convert(f"--input={source}", f"--output={output}", f"--variant={variant}") == 0
    metadata = load_converted(output).metadata
    assert (metadata["variant"], metadata["num_classes"], metadata["source_format"]) == (
        variant, 1000, layout)
    converted[layout] = load_pretrained(output)
    source.unlink()

  # The three layouts hold the same numbers, so they must give bit-identical params (HF included:
  # its checkpoints load into our official-numerics model).
  model, variables = converted["official"]
  for layout in ("timm", "hf"):
    jax.tree.map(np.testing.assert_array_equal, converted[layout][1], variables)
  count = sum(math.prod(x.shape) for x in jax.tree.leaves(variables))
  assert count == VARIANTS[variant].official.params

  rng = np.random.default_rng(0)
  for batch, height, width in SIZES[variant]:
    images = rng.standard_normal((batch, height, width, 3), dtype=np.float32)
    expected_logits, expected_maps = timm_outputs(reference, images)
    logits, maps = forward_with_stage_maps(model, variables, images)
    diffs = [max_diff(logits, expected_logits)]
    diffs += [max_diff(ours, theirs) for ours, theirs in zip(maps, expected_maps, strict=True)]
    print(f"{variant} {height}x{width}: max |diff| logits {diffs[0]:.2e}, maps "
          + ", ".join(f"{d:.2e}" for d in diffs[1:]))
    assert np.abs(expected_logits).max() > 0.1  # a meaningful comparison, not of near-zeros
    assert max(diffs) <= TOLERANCE, diffs


# The backward pass against PyTorch autograd, in both forms of the ops: XLA:CPU's (every custom
# gradient and C++ kernel in one check) and the plain ones GPUs and TPUs run. timm's parameter
# gradients go through the same converter as its weights (it only renames, transposes and
# splits, all linear), so they must equal ours leaf by leaf.
@pytest.mark.parametrize("forms", ["cpu", "plain"])
@pytest.mark.parametrize("variant,batch,height,width", [("b0", 2, 96, 72), ("b2_li", 1, 52, 84)])
def test_logits_and_parameter_gradients_equal_timm_autograd(variant, batch, height, width, forms):
  reference = random_timm_model(variant, seed=7)
  model, variables = create_model(variant), {
      "params": convert_state_dict(state_dict_in("timm", reference, variant)).params}
  rng = np.random.default_rng(1)
  images = rng.standard_normal((batch, height, width, 3), dtype=np.float32)
  cotangent = rng.standard_normal((batch, 1000), dtype=np.float32)

  logits = reference(torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))))
  (logits * torch.from_numpy(cotangent)).sum().backward()
  timm_grads = {name: p.grad.numpy() for name, p in reference.named_parameters()}
  expected = convert_state_dict(timm_grads).params

  def loss(params):
    ours = model.apply({"params": params}, images, train=True)
    return (ours * cotangent).sum(), ours

  with cpu.disabled() if forms == "plain" else contextlib.nullcontext():
    grads, ours = jax.jit(jax.grad(loss, has_aux=True))(variables["params"])
  assert max_diff(ours, logits.detach().numpy()) <= TOLERANCE
  worst = 0.0
  for (path, ours), theirs in zip(jax.tree_util.tree_leaves_with_path(grads),
                                  jax.tree.leaves(expected), strict=True):
    scale = float(np.abs(theirs).max())
    assert scale > 0, path
    error = max_diff(ours, theirs) / scale
    worst = max(worst, error)
    assert error <= 2e-5, (jax.tree_util.keystr(path), error)
  print(f"{variant} {height}x{width} ({forms} forms): worst |diff| / max |grad| over the leaves "
        f"{worst:.1e}")
