"""Jitted training and evaluation steps over the mesh.

The train state is a plain dict {'step', 'params', 'opt_state', 'rng'}; `rng` holds raw key data
(uint32) so that checkpoints stay plain arrays. Each step folds the step number into it, which
makes the randomness of step N independent of where a run was resumed.
"""


import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pvt_jax.cpu.compile_options import inference_compiler_options
from pvt_jax.train import sharding


def soft_cross_entropy(logits, soft_labels):
  """Per-example cross-entropy against soft targets (mixup / label smoothing)."""
  return -jnp.sum(soft_labels * jax.nn.log_softmax(logits.astype(jnp.float32)), axis=-1)


def make_train_step(model, tx, schedule, mesh, state_shardings, grad_accum_steps: int = 1):
  """A jitted `(state, batch) -> (state, metrics)`; the input state buffers are donated.

  With grad_accum_steps = k the global batch is cut into k interleaved micro-batches whose mean
  gradient is the big-batch gradient, so one call is still exactly one optimizer update.
  """

  def loss_fn(params, images, labels, rng):
    logits = model.apply({"params": params}, images, train=True, rngs={"dropout": rng})
    return soft_cross_entropy(logits, labels).mean()

  grad_fn = jax.value_and_grad(loss_fn)

  def micro_batches(x):
    # Interleaved (example i goes to micro-batch i % k) so every device holds part of each.
    x = x.reshape((x.shape[0] // grad_accum_steps, grad_accum_steps) + x.shape[1:])
    x = jnp.swapaxes(x, 0, 1)
    return jax.lax.with_sharding_constraint(
        x, NamedSharding(mesh, P(None, sharding.BATCH_AXES)))

  def train_step(state, batch):
    step, params = state["step"], state["params"]
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
    if grad_accum_steps == 1:
      loss, grads = grad_fn(params, batch["image"], batch["label"], rng)
    else:
      def accumulate(carry, xs):
        index, images, labels = xs
        loss, grads = grad_fn(params, images, labels, jax.random.fold_in(rng, index))
        return jax.tree.map(jnp.add, carry, (loss, grads)), None

      zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
      xs = (jnp.arange(grad_accum_steps), micro_batches(batch["image"]),
            micro_batches(batch["label"]))
      (loss, grads), _ = jax.lax.scan(accumulate, zeros, xs)
      loss, grads = jax.tree.map(lambda x: x / grad_accum_steps, (loss, grads))
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_state = {"step": step + 1, "params": optax.apply_updates(params, updates),
                 "opt_state": opt_state, "rng": state["rng"]}
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(step)}
    return new_state, metrics

  return jax.jit(train_step,
                 in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(state_shardings, sharding.replicated(mesh)),
                 donate_argnums=0)


def make_eval_step(model, mesh, params_shardings):
  """A jitted `(params, batch) -> sums` of top-1/top-5 hits, loss and count over masked examples."""

  def eval_step(params, batch):
    logits = model.apply({"params": params}, batch["image"]).astype(jnp.float32)
    labels, mask = batch["label"], batch["mask"]
    k = min(5, logits.shape[-1])
    top_k = jax.lax.top_k(logits, k)[1]
    hits = top_k == labels[:, None]
    one_hot = jax.nn.one_hot(labels, logits.shape[-1])
    return {
        "correct_top1": jnp.sum(hits[:, 0] & mask),
        "correct_top5": jnp.sum(hits.any(axis=-1) & mask),
        "loss_sum": jnp.sum(jnp.where(mask, soft_cross_entropy(logits, one_hot), 0.0)),
        "count": jnp.sum(mask),
    }

  return jax.jit(eval_step, in_shardings=(params_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh),
                 compiler_options=inference_compiler_options(mesh.devices.flat[0].platform))


