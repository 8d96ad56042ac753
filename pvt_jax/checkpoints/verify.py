"""Checks a conversion against timm's PyTorch PVT v2 (numerically the official model).

timm gets the checkpoint's own weights, only renamed to its keys, so an error in our array layout
changes cannot cancel out between conversion and comparison.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from pvt_jax.checkpoints import layouts
from pvt_jax.checkpoints.errors import CheckpointError
from pvt_jax.cpu.compile_options import inference_compiler_options

TOLERANCE = 5e-5


@dataclasses.dataclass(frozen=True)
class Differences:
  """Max |ours - timm| of the model output (logits, or pooled features without a head) and of
  the four stage maps."""
  output: float
  features: tuple[float, ...]

  @property
  def worst(self) -> float:
    return max(self.output, *self.features)

  def __str__(self):
    maps = ", ".join(f"{d:.2e}" for d in self.features)
    return f"max |diff| output {self.output:.2e}, stage maps [{maps}]"


def timm_available() -> bool:
  try:
    import timm  # noqa: F401 - only probing
    import torch  # noqa: F401
  except ImportError:
    return False
  return True


_STAGES = ("stage1", "stage2", "stage3", "stage4")


def forward_with_stage_maps(model, variables, images):
  """The model's output and its four NHWC stage maps, compiled as pvt_jax's evaluation compiles
  the forward pass (`inference_compiler_options`)."""

  @functools.partial(jax.jit, compiler_options=inference_compiler_options())
  def forward(variables, x):
    output, state = model.apply(variables, x, mutable=["intermediates"],
                                capture_intermediates=lambda module, _: module.name in _STAGES)
    return output, [state["intermediates"][name]["__call__"][0] for name in _STAGES]

  return forward(variables, jnp.asarray(images))


def compare_with_timm(state_dict: dict, variant: str, model, variables, *,
                      image_size=(224, 224), batch_size: int = 2, seed: int = 0) -> Differences:
  """Runs timm's pvt_v2_<variant> holding `state_dict` (official keys) and our model on one random
  batch. The head of `state_dict` is used only when `model` has one."""
  import timm
  import torch

  num_classes = model.num_classes
  weights = {key: torch.from_numpy(np.ascontiguousarray(value))
             for key, value in layouts.from_official(state_dict, "timm").items()
             if num_classes or not key.startswith("head.")}
  reference = timm.create_model(f"pvt_v2_{variant}", pretrained=False, num_classes=num_classes)
  try:
    reference.load_state_dict(weights, strict=True)
  except RuntimeError as error:
    raise CheckpointError(f"timm rejects the weights: {str(error).splitlines()[0]}") from None
  reference.eval()
  images = np.random.default_rng(seed).standard_normal((batch_size, 3, *image_size), np.float32)
  with torch.no_grad():
    final, maps = reference.forward_intermediates(torch.from_numpy(images))
    expected = [reference.forward_head(final).numpy()] + [m.numpy().transpose(0, 2, 3, 1)
                                                           for m in maps]

  output, features = forward_with_stage_maps(model, variables, images.transpose(0, 2, 3, 1))
  diffs = [float(np.max(np.abs(np.asarray(ours) - theirs)))
           for ours, theirs in zip([output, *features], expected, strict=True)]
  return Differences(diffs[0], tuple(diffs[1:]))
