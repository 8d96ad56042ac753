"""RetinaNet's detection machinery in JAX with static shapes: boxes, anchors, targets, losses and
inference, numerically mmdet's (see each module). The network is `pvt_jax.models.retinanet`."""

from pvt_jax.detection.anchor_head import RetinaNetSettings, flatten_levels, loss, predict
from pvt_jax.detection.anchors import AnchorGenerator
from pvt_jax.detection.inference import InferenceSettings, batched_nms, detect
from pvt_jax.detection.targets import MaxIoUAssigner, anchor_targets

__all__ = ["AnchorGenerator", "InferenceSettings", "MaxIoUAssigner", "RetinaNetSettings",
           "anchor_targets", "batched_nms", "detect", "flatten_levels", "loss", "predict"]
