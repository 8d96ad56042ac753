"""What a task supplies to the trainer: data, model, loss and evaluation.

The loop (pvt_jax/train/loop.py) owns everything else and is the same for every task: config and
workdir checks, the mesh and shardings, the train state, the jitted train and eval steps,
gradient accumulation, the optimizer and its schedule (`config.optimizer.schedule`),
checkpoints (ranked by `Task.best_metric`), preemption, logging and the CLIs. A task object holds
no state; `pvt_jax.tasks.get_task(config.task)` returns it.

Train state (a plain dict; what the checkpoints hold):

  {'step': int32 [], 'params': ..., 'opt_state': ..., 'rng': uint32 key data, **collections}

`collections` are the model's variable collections other than 'params' (e.g. 'batch_stats' of
BatchNorm), as `init_variables` returns them. The optimizer trains 'params'; each collection is
replaced by what `loss` returns for it at every step (for gradient accumulation, threaded through
the micro-batches in order), and it is saved, restored and evaluated with the rest.

Batches: the iterators yield this process's part of each global batch as a dict of numpy arrays,
each with the batch as its leading dimension; the loop makes global arrays of them, split over
the mesh's batch axes ('data', 'fsdp'), and calls the jitted steps. Shapes must be static per
compiled program (a few distinct shapes, e.g. segmentation's eval buckets, compile once each).
A BatchNorm over the batch axis of such a global array reduces over the whole data-parallel batch
(SyncBN; XLA inserts the all-reduce), so no axis names are needed.

Randomness: the loop folds the step into the state's key, so the randomness of step N does not
depend on where a run was resumed, nor on the number of devices or processes; `augment_batch`
and `loss` get keys derived from it.

Evaluation: `eval_outputs` runs inside the jitted eval step on a global batch, and its outputs
are replicated: every process receives all of them (XLA reduces or gathers over devices and
processes). Two kinds of output, freely mixed in one pytree:

  sums         reduced over the batch inside `eval_outputs` (masked hit counts, a confusion
               matrix); the accumulator adds them up (`SumAccumulator`);
  per-example  [B, ...] arrays of fixed size per example (e.g. the 100 best detections of each
               image) together with batch['mask']; the accumulator keeps the rows whose mask is
               True. The eval iterators pad every process to the same number of whole batches
               with mask False rows and give each real example to exactly one process, so each
               example arrives exactly once, on every process.

`EvalAccumulator.result()` runs on every process and must give the same values on each: it is
what checkpoints are ranked by (`best_metric`, higher is better) and what is logged.
"""

import abc
import dataclasses

import jax
import ml_collections
import numpy as np
from flax import linen as nn


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the loop and its summaries need to know of a task's dataset."""
  name: str
  num_classes: int
  class_names: tuple[str, ...]  # () when the dataset does not name its classes
  num_train_examples: int
  num_eval_examples: int
  train_split: str
  eval_split: str
  steps_per_epoch: int  # optimizer steps per pass over the training split
  train_class_counts: tuple[int, ...] = ()  # examples per class, where cheap to know (folders)
  eval_class_counts: tuple[int, ...] = ()

  def record(self) -> dict:
    """JSON-able, for `<workdir>/dataset.json` (e.g. class names for a prediction CLI)."""
    return dataclasses.asdict(self)


class EvalAccumulator(abc.ABC):
  """Collects one evaluation pass on the host; a fresh one per pass (`Task.eval_accumulator`)."""

  @abc.abstractmethod
  def update(self, outputs, batch: dict) -> None:
    """outputs: one global batch's `eval_outputs` as numpy (the same on every process);
    batch: this process's host batch, as the eval iterator yielded it."""

  @abc.abstractmethod
  def result(self) -> dict:
    """Metric name -> float (or a dict of them, e.g. per-class IoU: logged as `eval/iou/<k>`)."""

  def write_files(self, workdir: str, step: int) -> None:
    """Files beside the metrics after an eval at `step` (pictures, predictions); process 0."""
    del workdir, step


def _widen(x) -> np.ndarray:
  x = np.asarray(x)
  return x.astype(np.float64 if x.dtype.kind == "f" else np.int64)


class SumAccumulator(EvalAccumulator):
  """Adds up every leaf of the outputs over the batches (Python ints and float64, so that the
  sum of many batches loses nothing); `result` finalises `self.totals`."""

  def __init__(self):
    self.totals = None

  def update(self, outputs, batch: dict) -> None:
    del batch
    values = jax.tree.map(_widen, outputs)
    self.totals = values if self.totals is None else jax.tree.map(np.add, self.totals, values)


class Task(abc.ABC):
  """One kind of training (classification, segmentation, detection); see the module docstring."""

  name: str  # config.task
  best_metric: str  # key of EvalAccumulator.result() that ranks checkpoints; higher is better
  plot_metrics: tuple[str, ...] = ()  # eval metrics (fractions) drawn in metrics.png

  @abc.abstractmethod
  def default_config(self, variant: str) -> ml_collections.ConfigDict:
    """The task's config defaults (of its pvt_jax/configs module), which fill in the fields a
    workdir's config.json predates."""

  def check_config(self, config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError for values of the task's own fields that cannot run; called before
    any data is opened (the loop checks the fields every task shares)."""
    del config

  @abc.abstractmethod
  def dataset_info(self, config) -> DatasetInfo:
    """Classes and split sizes of config's dataset (may prepare it on first use)."""

  @abc.abstractmethod
  def create_model(self, config, num_classes: int) -> nn.Module:
    """The network (`loop.model_kwargs(config)` holds the backbone settings every task shares)."""

  @abc.abstractmethod
  def init_variables(self, model: nn.Module, config, rng) -> dict:
    """{'params', ...collections} of a fresh model; traced (jax.eval_shape / jit)."""

  @abc.abstractmethod
  def load_init(self, config, variables: dict, shardings: dict) -> tuple[dict, str]:
    """`variables` (global arrays on `shardings`) with what config.init_from provides, and a few
    words on what was taken (reported as "initialised from <init_from> (<words>)"). Called only
    for a fresh start with init_from set."""

  @abc.abstractmethod
  def train_iterator(self, config, start_step: int):
    """Infinite iterator of this process's training batches from step `start_step` on, equal to
    the stream of an uninterrupted run from there."""

  @abc.abstractmethod
  def eval_iterator(self, config):
    """Finite iterator of this process's eval batches (with 'mask'), see the module docstring."""

  def augment_batch(self, config, batch: dict, rng) -> dict:
    """Batch-level augmentation of a global training batch inside the jitted train step, before
    it is cut into micro-batches (e.g. mixup/cutmix); `rng` is folded from the step."""
    del config, rng
    return batch

  @abc.abstractmethod
  def loss(self, model: nn.Module, variables: dict, batch: dict, rng) -> tuple:
    """(scalar loss, {name: scalar} extra train metrics, {collection: new value}) of a (micro-)
    batch in training mode; `variables` = {'params', ...collections}; inside jit."""

  @abc.abstractmethod
  def eval_outputs(self, model: nn.Module, variables: dict, batch: dict):
    """Pytree of sums and/or per-example outputs of an eval batch (module docstring); in jit."""

  @abc.abstractmethod
  def eval_accumulator(self, config, info: DatasetInfo) -> EvalAccumulator:
    """A fresh accumulator for one evaluation pass."""

  @abc.abstractmethod
  def describe_eval(self, result: dict) -> str:
    """One line for the console, e.g. "top-1 0.8263, top-5 0.9921, loss 0.4710 over 10000
    examples"."""
