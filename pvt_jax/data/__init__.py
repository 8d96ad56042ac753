"""Input pipelines of pvt_jax (tf.data over tensorflow-datasets); see README.md in this folder.

  info = dataset_info(config)            # num_classes, split sizes
  batches = train_iterator(config, start_step)   # infinite, exactly resumable, per process
  batches = eval_iterator(config)        # finite, padded to whole global batches with a mask
"""

import os

# Before TensorFlow's first import (pipeline.py, sources.py): its C++ runtime reads the level once.
# Hides INFO/WARNING chatter (CPU-feature notice, tf.data warnings); errors still print.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pvt_jax.data.errors import DatasetError  # noqa: E402
from pvt_jax.data.pipeline import (  # noqa: E402
    DatasetInfo,
    dataset_info,
    eval_iterator,
    measure_throughput,
    train_iterator,
)

__all__ = ["DatasetError", "DatasetInfo", "dataset_info", "eval_iterator", "measure_throughput",
           "train_iterator"]
