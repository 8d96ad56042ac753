"""Semantic segmentation input pipelines (tf.data): sources, the official Semantic FPN
transforms, and train/eval iterators with the classification pipeline's guarantees.

  info = dataset_info(config)                  # classes, split sizes
  batches = train_iterator(config, start_step)  # infinite, exactly resumable, per process
  batches = eval_iterator(config)               # static-shape buckets, padded with a mask
"""

from pvt_jax.data.segmentation.pipeline import (
    EvalBucket,
    SegmentationInfo,
    dataset_info,
    eval_iterator,
    eval_plan,
    train_iterator,
)
from pvt_jax.data.segmentation.sources import ADE20K_CLASSES, open_source

__all__ = ["ADE20K_CLASSES", "EvalBucket", "SegmentationInfo", "dataset_info", "eval_iterator",
           "eval_plan", "open_source", "train_iterator"]
