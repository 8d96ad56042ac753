"""COCO box AP with pycocotools' COCOeval over fixed-size detections gathered from any number
of hosts, the detections JSON, and a picture of a few images with their boxes.

`CocoEvaluator.update` takes host arrays of whole (gathered) eval batches: rows with mask False
are padding; boxes are mapped from the resized image back to the stored image by dividing by
the batch's scale factors (mmdet's `rescale=True`), then written as COCO results with the
dataset's category ids. An image arriving twice is an error, so a faulty gather cannot count an
image twice; COCOeval scores exactly the images that arrived.
"""

import contextlib
import io
import json

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def load_ground_truth(ground_truth) -> COCO:
  """A pycocotools COCO from a COCO-format dict or json path (its prints silenced)."""
  with contextlib.redirect_stdout(io.StringIO()):
    if isinstance(ground_truth, dict):
      coco = COCO()
      coco.dataset = ground_truth
      coco.createIndex()
      return coco
    return COCO(ground_truth)


class CocoEvaluator:
  """Accumulates detections of an eval pass; `result()` runs COCOeval (bbox)."""

  def __init__(self, ground_truth, category_ids):
    self.coco = ground_truth if isinstance(ground_truth, COCO) else load_ground_truth(
        ground_truth)
    self.category_ids = np.asarray(category_ids)
    self.image_ids: list[int] = []
    self.detections: list[dict] = []
    self.summary = ""

  def update(self, outputs: dict) -> None:
    """outputs: 'boxes' [B, K, 4], 'scores', 'labels', 'valid' [B, K], 'image_id', 'mask' [B],
    'scale_factor' [B, 2] (width, height factors of the resize), numpy."""
    mask = np.asarray(outputs["mask"], bool)
    ids = np.asarray(outputs["image_id"])[mask]
    seen = set(self.image_ids)
    for image_id in ids.tolist():
      if image_id in seen:
        raise ValueError(f"image {image_id} arrived twice in the evaluation")
      if image_id not in self.coco.imgs:
        raise ValueError(f"image {image_id} is not in the ground truth")
      seen.add(image_id)
    self.image_ids.extend(int(i) for i in ids)
    scale = np.tile(np.asarray(outputs["scale_factor"], np.float64)[mask], 2)[:, None, :]
    boxes = np.asarray(outputs["boxes"], np.float64)[mask] / scale
    scores = np.asarray(outputs["scores"])[mask]
    labels = np.asarray(outputs["labels"])[mask]
    valid = np.asarray(outputs["valid"], bool)[mask]
    for image_id, b, s, lab, v in zip(ids, boxes, scores, labels, valid, strict=True):
      for (x1, y1, x2, y2), score, label in zip(b[v], s[v], lab[v], strict=True):
        self.detections.append({"image_id": int(image_id),
                                "category_id": int(self.category_ids[label]),
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)})

  def result(self) -> dict:
    """{'AP', 'AP50', 'AP75', 'APs', 'APm', 'APl' (COCOeval's -1 where undefined),
    'num_images', 'num_detections'}; the printed COCOeval table is in `self.summary`."""
    counts = {"num_images": len(self.image_ids), "num_detections": len(self.detections)}
    if not self.detections:
      return {**dict.fromkeys(METRICS, 0.0), **counts}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      evaluation = COCOeval(self.coco, self.coco.loadRes(self.detections), "bbox")
      evaluation.params.imgIds = sorted(self.image_ids)
      evaluation.evaluate()
      evaluation.accumulate()
      evaluation.summarize()
    self.summary = out.getvalue()
    return {**{name: float(v) for name, v in zip(METRICS, evaluation.stats, strict=False)},
            **counts}

  def ground_truth_boxes(self, image_ids, scale_factors) -> dict:
    """The images' ground truth in resized-image pixels, for `draw_detections`: 'boxes'
    [n, G, 4], 'labels', 'box_mask' [n, G] (G the most boxes of one of them)."""
    contiguous = {int(c): k for k, c in enumerate(self.category_ids)}
    per_image = [[a for a in self.coco.imgToAnns[int(i)] if int(a["category_id"]) in contiguous]
                 for i in image_ids]
    count = max([len(anns) for anns in per_image] + [1])
    out = {"boxes": np.zeros((len(per_image), count, 4), np.float32),
           "labels": np.zeros((len(per_image), count), np.int32),
           "box_mask": np.zeros((len(per_image), count), bool)}
    for k, (anns, scale) in enumerate(zip(per_image, scale_factors, strict=True)):
      for n, ann in enumerate(anns):
        x, y, w, h = ann["bbox"]
        out["boxes"][k, n] = np.array([x, y, x + w, y + h]) * np.tile(scale, 2)
        out["labels"][k, n] = contiguous[int(ann["category_id"])]
        out["box_mask"][k, n] = True
    return out

  def save_detections(self, path: str) -> None:
    """The detections in COCO results format (what COCOeval and the COCO server read)."""
    with open(path, "w") as f:
      json.dump(self.detections, f)


def draw_detections(path: str, images, detections: dict, class_names, ground_truth=None,
                    score_thr: float = 0.3) -> None:
  """A PNG of `images` (uint8 [n, h, w, 3]) with predicted boxes (solid, labelled with class
  and score, above `score_thr`) and, if given, ground-truth boxes (dashed). `detections`:
  'boxes' [n, K, 4], 'scores', 'labels', 'valid' [n, K] in the images' pixels;
  `ground_truth`: 'boxes' [n, G, 4], 'labels', 'box_mask' [n, G]."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  n = len(images)
  fig, axes = plt.subplots(1, n, figsize=(4 * n, 4), squeeze=False)
  colours = plt.get_cmap("tab20")
  for k, ax in enumerate(axes[0]):
    ax.imshow(images[k])
    ax.set_axis_off()
    if ground_truth is not None:
      mask = np.asarray(ground_truth["box_mask"][k], bool)
      for (x1, y1, x2, y2), label in zip(ground_truth["boxes"][k][mask],
                                         ground_truth["labels"][k][mask], strict=True):
        ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, linestyle="--",
                                   linewidth=1, edgecolor=colours(int(label) % 20)))
    keep = np.asarray(detections["valid"][k], bool) & (np.asarray(detections["scores"][k])
                                                        > score_thr)
    for (x1, y1, x2, y2), label, score in zip(detections["boxes"][k][keep],
                                              detections["labels"][k][keep],
                                              detections["scores"][k][keep], strict=True):
      colour = colours(int(label) % 20)
      ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, linewidth=1.5,
                                 edgecolor=colour))
      ax.text(x1, y1, f"{class_names[int(label)]} {score:.2f}", fontsize=7, color="white",
              bbox={"facecolor": colour, "pad": 1, "linewidth": 0}, verticalalignment="bottom")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
