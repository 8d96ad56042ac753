"""Detection data: COCO-format datasets (COCO 2017's release layout or your own), tfds
`coco/2017`, and an offline Fashion-MNIST detection set, fed as fixed-shape numpy batches.

  info = dataset_info(config)                 # classes, category ids, sizes, steps per epoch
  batches = train_iterator(config, start_step)  # infinite, exactly resumable, per process
  batches = eval_iterator(config)             # finite, padded to whole global batches, masked
  split = open_split(config, config.eval_split)  # its `ground_truth` is what COCOeval scores
"""

from pvt_jax.data.detection.index import DetectionSplit
from pvt_jax.data.detection.pipeline import (
    DetectionInfo,
    dataset_info,
    epoch_schedule,
    eval_iterator,
    open_split,
    train_iterator,
)
from pvt_jax.data.detection.synthetic import SyntheticSettings, export_coco_layout

__all__ = ["DetectionInfo", "DetectionSplit", "SyntheticSettings", "dataset_info",
           "epoch_schedule", "eval_iterator", "export_coco_layout", "open_split",
           "train_iterator"]
