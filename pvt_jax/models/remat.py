"""Rematerialisation (gradient checkpointing) of the transformer blocks, by policy name.

As big_vision's `remat_policy` and timm's `set_grad_checkpointing`: the backward pass recomputes a
block's activations instead of keeping them, trading compute for memory (what lets B5 or 512 px
inputs train with a large per-device batch). The policy says what each block still keeps:
"none" (no remat), "full" (only the block's input), or a `jax.checkpoint_policies` name.
"""

import flax.linen as nn
import jax

# Policy name -> `jax.checkpoint` policy (None: save nothing). Only the policies that take no
# arguments; "nothing_saveable" is "full" under jax's name.
POLICIES = {
    "full": None,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}
NAMES = ("none", *POLICIES)


def check(policy: str) -> None:
  """A one-line error for an unknown policy name."""
  if policy not in NAMES:
    raise ValueError(f"unknown remat policy {policy!r}; choose one of {', '.join(NAMES)}")


def block_class(block: type[nn.Module], policy: str) -> type[nn.Module]:
  """`block` (called as block(x, train)) rematerialised under `policy`; itself for "none"."""
  check(policy)
  if policy == "none":
    return block
  # `train` is a Python bool (static); prevent_cse keeps XLA from merging the recomputation
  # with the forward pass (needed outside a scan).
  return nn.remat(block, policy=POLICIES[policy], static_argnums=(2,), prevent_cse=True)


def residual_bytes(fn, *args) -> int:
  """Bytes that the forward pass of fn(*args) keeps for the backward besides the arguments (the
  leaves of its VJP closure): the activation memory remat trades for recomputation, as GPUs and
  TPUs compile it. XLA:CPU drops remat's optimization barriers and merges the recomputation back
  into the forward pass, so there the compiled step keeps everything whatever the policy."""
  def nbytes(tree):
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))
  return nbytes(jax.eval_shape(lambda *a: jax.vjp(fn, *a)[1], *args)) - nbytes(args)
