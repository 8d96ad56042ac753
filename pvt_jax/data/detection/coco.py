"""COCO-format detection data: COCO 2017 in its release layout (`<root>/<split>/` images and
`<root>/annotations/instances_<split>.json`, e.g. split `train2017`), or a dataset of your own in
that layout; categories are numbered 0..K-1 in the order of their ids, as mmdet does."""

import json
import os

import numpy as np

from pvt_jax.data.detection.index import BoxCleaner, DetectionSplit
from pvt_jax.data.detection.readers import FileReader
from pvt_jax.data.errors import DatasetError

# COCO 2017's 80 categories: (id, name), as in instances_*2017.json (and mmdet's CocoDataset).
COCO_CATEGORIES = tuple(zip(
    (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28,
     31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55,
     56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84,
     85, 86, 87, 88, 89, 90),
    ("person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
     "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
     "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
     "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
     "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
     "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
     "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
     "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
     "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
     "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush"), strict=True))


# What COCOeval and the pipeline read of each entry.
_REQUIRED = {"images": ("id", "height", "width", "file_name"),
             "annotations": ("id", "image_id", "category_id", "bbox", "area"),
             "categories": ("id", "name")}


def layout_paths(root: str, split: str) -> tuple[str, str]:
  """(annotation json, image directory) of `split` in the release layout under `root`."""
  return (os.path.join(root, "annotations", f"instances_{split}.json"),
          os.path.join(root, split))


def _load_json(path: str) -> dict:
  try:
    with open(path) as f:
      data = json.load(f)
  except FileNotFoundError:
    raise DatasetError(f"{path}: no such annotation file (COCO layout: <root>/annotations/"
                       f"instances_<split>.json and images in <root>/<split>/)") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise DatasetError(f"{path}: not a JSON file ({error})") from None
  missing = [key for key in ("images", "annotations", "categories") if key not in data]
  if missing or not isinstance(data.get("images"), list):
    raise DatasetError(f"{path}: not a COCO detection file (lacks {', '.join(missing)})")
  for what, fields in _REQUIRED.items():
    for entry in data[what]:
      lacking = [field for field in fields if field not in entry]
      if lacking:
        raise DatasetError(f"{path}: an entry of {what} ({str(entry)[:60]}) lacks "
                           f"{', '.join(lacking)}")
  return data


def open_coco_split(root: str, split: str) -> DetectionSplit:
  """The split `split` of the COCO-layout dataset under `root`."""
  annotation_file, image_dir = layout_paths(root, split)
  data = _load_json(annotation_file)
  name = f"{os.path.basename(os.path.normpath(root)) or root} {split}"
  categories = sorted(data["categories"], key=lambda c: c["id"])
  if not categories:
    raise DatasetError(f"{annotation_file}: no categories")
  category_ids = tuple(int(c["id"]) for c in categories)
  class_names = tuple(str(c["name"]) for c in categories)
  per_image = {int(image["id"]): [] for image in data["images"]}
  for ann in data["annotations"]:
    if int(ann["image_id"]) not in per_image:
      raise DatasetError(f"{annotation_file}: annotation {ann.get('id')} refers to image "
                         f"{ann['image_id']}, which the file does not list")
    per_image[int(ann["image_id"])].append(ann)
  cleaner = BoxCleaner(name, category_ids)
  boxes, labels, sizes, paths, ids = [], [], [], [], []
  for image in data["images"]:
    anns = per_image[int(image["id"])]
    height, width = int(image["height"]), int(image["width"])
    b, lab = cleaner([a["bbox"] for a in anns], [a["category_id"] for a in anns],
                     [a.get("iscrowd", 0) for a in anns], [a["area"] for a in anns],
                     height, width)
    boxes.append(b)
    labels.append(lab)
    sizes.append((height, width))
    paths.append(os.path.join(image_dir, image["file_name"]))
    ids.append(int(image["id"]))
  cleaner.report()
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    raise DatasetError(f"{name}: image file {missing[0]} is missing{more}")
  return DetectionSplit(name, class_names, category_ids, np.array(ids, np.int64),
                        np.array(sizes, np.int32).reshape(-1, 2), tuple(boxes), tuple(labels),
                        annotation_file, FileReader(paths))
