"""Jitted training and evaluation steps over the mesh, for any task (pvt_jax/tasks/base.py).

The train state is a plain dict {'step', 'params', 'opt_state', 'rng', **collections}; `rng`
holds raw key data (uint32) so that checkpoints stay plain arrays. Each step folds the step
number into it, which makes the randomness of step N independent of where a run was resumed.
"""

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pvt_jax.cpu.compile_options import inference_compiler_options
from pvt_jax.train import sharding

TRAIN_KEYS = ("step", "params", "opt_state", "rng")
_AUGMENT_STREAM = 1  # fold_in index of the batch-augmentation key (the loss gets the step's key)


def collections(state) -> tuple[str, ...]:
  """The model's mutable variable collections held in a train state (e.g. 'batch_stats')."""
  return tuple(k for k in state if k not in TRAIN_KEYS)


def model_variables(state) -> dict:
  """{'params', ...collections} of a train state: what `model.apply` takes."""
  return {"params": state["params"], **{k: state[k] for k in collections(state)}}


def all_finite(tree):
  """True when every floating-point leaf of `tree` is finite (a scalar bool, inside jit)."""
  leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def make_train_step(task, config, model, tx, schedule, mesh, state_shardings,
                    grad_accum_steps: int = 1):
  """A jitted `(state, batch) -> (state, metrics)`; the input state buffers are donated.

  With grad_accum_steps = k the global batch is cut into k interleaved micro-batches whose mean
  gradient is the big-batch gradient, so one call is still exactly one optimizer update; mutable
  collections (BatchNorm statistics) go through the micro-batches in order.
  metrics: 'loss', 'grad_norm', 'lr' (of this update), 'finite' (the new params, optimizer
  state and collections, i.e. what a checkpoint of it would hold, are all finite) and the task's
  loss metrics.
  """
  names = collections(state_shardings)

  def loss_fn(params, model_state, batch, rng):
    loss, metrics, new_model_state = task.loss(model, {"params": params, **model_state}, batch,
                                               rng)
    return loss, (metrics, {k: new_model_state[k] for k in names})

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def micro_batches(x):
    # Interleaved (example i goes to micro-batch i % k) so every device holds part of each.
    x = x.reshape((x.shape[0] // grad_accum_steps, grad_accum_steps) + x.shape[1:])
    x = jnp.swapaxes(x, 0, 1)
    return jax.lax.with_sharding_constraint(
        x, NamedSharding(mesh, P(None, sharding.BATCH_AXES)))

  def train_step(state, batch):
    step, params = state["step"], state["params"]
    model_state = {k: state[k] for k in names}
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
    batch = task.augment_batch(config, batch, jax.random.fold_in(rng, _AUGMENT_STREAM))
    if grad_accum_steps == 1:
      (loss, (metrics, model_state)), grads = grad_fn(params, model_state, batch, rng)
    else:
      def accumulate(carry, xs):
        sums, model_state = carry
        index, micro_batch = xs
        (loss, (metrics, model_state)), grads = grad_fn(params, model_state, micro_batch,
                                                        jax.random.fold_in(rng, index))
        return (jax.tree.map(jnp.add, sums, (loss, metrics, grads)), model_state), None

      micro = (jnp.arange(grad_accum_steps), jax.tree.map(micro_batches, batch))
      shapes = jax.eval_shape(grad_fn, params, model_state,
                              jax.tree.map(lambda x: x[0], micro[1]), rng)
      (_, (metric_shapes, _)), _ = shapes
      zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, metric_shapes),
               jax.tree.map(jnp.zeros_like, params))
      (sums, model_state), _ = jax.lax.scan(accumulate, (zeros, model_state), micro)
      loss, metrics, grads = jax.tree.map(lambda x: x / grad_accum_steps, sums)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    new_state = {"step": step + 1, "params": new_params, "opt_state": opt_state,
                 "rng": state["rng"], **model_state}
    metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads),
               "lr": schedule(step), "finite": all_finite((new_params, opt_state, model_state))}
    return new_state, metrics

  return jax.jit(train_step,
                 in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(state_shardings, sharding.replicated(mesh)),
                 donate_argnums=0)


def make_eval_step(task, model, mesh, variables_shardings):
  """A jitted `(variables, batch) -> task.eval_outputs(...)`, replicated on every device (and so
  on every process); compiled with the backend's inference options."""

  def eval_step(variables, batch):
    return task.eval_outputs(model, variables, batch)

  return jax.jit(eval_step, in_shardings=(variables_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh),
                 compiler_options=inference_compiler_options(mesh.devices.flat[0].platform))
