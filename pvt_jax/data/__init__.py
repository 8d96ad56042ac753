"""Input pipelines of pvt_jax (tf.data over tensorflow-datasets); see README.md in this folder.

  info = dataset_info(config)            # num_classes, split sizes
  batches = train_iterator(config, start_step)   # infinite, exactly resumable, per process
  batches = eval_iterator(config)        # finite, padded to whole global batches with a mask
"""

from pvt_jax.data.errors import DatasetError
from pvt_jax.data.pipeline import (
    DatasetInfo,
    dataset_info,
    eval_iterator,
    measure_throughput,
    train_iterator,
)

__all__ = ["DatasetError", "DatasetInfo", "dataset_info", "eval_iterator", "measure_throughput",
           "train_iterator"]
