"""Semantic segmentation metrics with mmseg's semantics: mIoU, mAcc, aAcc, per-class IoU/Acc.

A confusion matrix (rows: label, columns: prediction) is computed on device per batch; under
`jax.jit` with a globally sharded batch it is already the sum over all devices and hosts (XLA
inserts the reduction), so every process holds the same matrix. The host adds batches up in
int64 (`ConfusionMatrix`) and finalises. As in mmseg's `IoUMetric`: pixels labelled 255 (or any
label outside [0, num_classes)) are not scored, a class absent from both labels and predictions
has IoU NaN and is left out of the mean, and one absent from the labels has accuracy NaN.
"""

import jax.numpy as jnp
import numpy as np

IGNORE_INDEX = 255


def confusion_matrix(labels, predictions, num_classes: int, mask=None):
  """int32 [K, K] counts of (label, prediction) pairs over the scored pixels of a batch.

  labels, predictions: int [B, ...]; mask: bool [B] (padding examples False) or None."""
  labels = labels.astype(jnp.int32)
  valid = (labels >= 0) & (labels < num_classes)
  if mask is not None:
    valid &= mask.reshape(mask.shape + (1,) * (labels.ndim - 1))
  pairs = jnp.where(valid, labels * num_classes + predictions.astype(jnp.int32), 0)
  counts = jnp.bincount(pairs.ravel(), weights=valid.ravel().astype(jnp.int32),
                        length=num_classes * num_classes)
  return counts.astype(jnp.int32).reshape(num_classes, num_classes)


def scores(confusion: np.ndarray, class_names=None) -> dict:
  """mIoU, mAcc, aAcc (fractions, not %) and per-class IoU / Acc of an accumulated matrix."""
  confusion = np.asarray(confusion, np.float64)
  intersection = np.diag(confusion)
  label_area, prediction_area = confusion.sum(axis=1), confusion.sum(axis=0)
  union = label_area + prediction_area - intersection
  with np.errstate(divide="ignore", invalid="ignore"):
    iou = intersection / union
    accuracy = intersection / label_area
    overall = intersection.sum() / label_area.sum()
  names = class_names or [str(i) for i in range(len(confusion))]
  return {"miou": _nanmean(iou), "macc": _nanmean(accuracy), "aacc": float(overall),
          "iou": dict(zip(names, iou.tolist(), strict=True)),
          "acc": dict(zip(names, accuracy.tolist(), strict=True))}


def _nanmean(values: np.ndarray) -> float:
  return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


class ConfusionMatrix:
  """Host-side int64 sum of per-batch (already globally reduced) confusion matrices."""

  def __init__(self, num_classes: int, class_names=None):
    self.total = np.zeros((num_classes, num_classes), np.int64)
    self.class_names = class_names

  def update(self, confusion) -> None:
    self.total += np.asarray(confusion, np.int64)

  def result(self) -> dict:
    return scores(self.total, self.class_names)


def palette(num_classes: int) -> np.ndarray:
  """uint8 [K, 3] distinct, fixed colours (tab20 first, then seeded random ones)."""
  from matplotlib import colormaps

  base = (np.asarray(colormaps["tab20"].colors) * 255).astype(np.uint8)
  extra = np.random.default_rng(0).integers(0, 256, (max(num_classes - len(base), 0), 3))
  return np.concatenate([base, extra.astype(np.uint8)])[:num_classes]


def save_overlays(path, images, image_sizes, labels, label_sizes, predictions, masks=None,
                  class_names=None, num_images: int = 4, alpha: float = 0.5) -> int:
  """Writes a PNG with one row per image: the image, ground truth over it, prediction over it.

  images: float [B, Hc, Wc, 3] normalised as the eval pipeline gives them (image_sizes [B, 2]
  their valid part); labels, predictions: int [B, Lh, Lw] (label_sizes [B, 2] valid; labels 255
  are left uncoloured). Returns the number of images drawn (examples with mask False are skipped).
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from PIL import Image

  from pvt_jax.data import augment

  chosen = [i for i in range(len(images)) if masks is None or masks[i]][:num_images]
  if not chosen:
    return 0
  num_classes = len(class_names) if class_names else int(np.max(predictions)) + 1
  colours = palette(max(num_classes, 1))
  mean, std = np.asarray(augment.MEAN_RGB) * 255, np.asarray(augment.STD_RGB) * 255
  figure, axes = plt.subplots(len(chosen), 3, figsize=(9, 3 * len(chosen)), squeeze=False)
  for row, i in zip(axes, chosen, strict=True):
    (ih, iw), (lh, lw) = image_sizes[i], label_sizes[i]
    rgb = np.clip(np.asarray(images[i][:ih, :iw]) * std + mean, 0, 255).astype(np.uint8)
    rgb = np.asarray(Image.fromarray(rgb).resize((int(lw), int(lh)), Image.BILINEAR), np.float64)
    for ax, title, classes in ((row[0], "image", None), (row[1], "ground truth", labels[i]),
                               (row[2], "prediction", predictions[i])):
      shown = rgb.copy()
      if classes is not None:
        classes = np.asarray(classes[:lh, :lw])
        scored = (classes >= 0) & (classes < len(colours))
        shown[scored] = (1 - alpha) * shown[scored] + alpha * colours[classes[scored]]
      ax.imshow(shown.astype(np.uint8))
      ax.set_title(title)
      ax.axis("off")
  figure.tight_layout()
  figure.savefig(path, dpi=80)
  plt.close(figure)
  return len(chosen)
