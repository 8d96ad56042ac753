"""RetinaNet detection configs: the official COCO 1x recipe, its 3x variant, and a quick offline
run on a detection set built from Fashion-MNIST.

Modes (after the colon of `configs/retinanet.py:<variant>,<modes>`):

  (none)     quick offline run: 64 px canvases of 1-3 Fashion-MNIST garments (10 classes), B0
             from scratch, batch 8, 600 steps on a CPU; COCO AP on its 500 val images.
  coco       the official `retinanet_pvt_v2_*_fpn_1x_coco.py`: COCO 2017 (release layout, by
             default in data/coco as mmdet's configs have it; `--config.dataset=coco:/path`),
             short side 800 / long side <= 1333, flip 0.5, AdamW lr 1e-4 wd 1e-4,
             batch 16, 12 epochs, lr x0.1 at epochs 8 and 11 after a 500-step linear warmup.
  3x         36 epochs, steps at 27 and 33, multi-scale training (short side 640-800).
  runlocal   shrink whatever was chosen to a smoke test.

e.g. `--config=configs/retinanet.py:b2,coco --config.dataset=coco:/data/coco`.
"""

import ml_collections

from pvt_jax.configs import base

MODES = ("coco", "3x", "runlocal")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: the variant (default b0), then modes (module docstring)."""
  variant, modes = base.parse_arg(arg, MODES)
  c = base.base_config(variant)
  c.task = "detection"
  c.num_classes = 0  # 0: the dataset's categories
  c.drop_path_rate = 0.1  # the official detection backbones use 0.1 for every variant

  # Data (pvt_jax/data/detection): "fashion_mnist", "coco:<root>" (COCO layout) or
  # "tfds:coco/2017".
  c.dataset = "coco:data/coco"
  c.train_split, c.eval_split = "train2017", "val2017"
  c.image_scale = (1333, 800)  # mmdet's Resize scale: long side <= 1333, short side 800
  c.canvas_sizes = ((800, 1344), (1344, 800))  # fixed shapes: landscape and portrait
  c.size_divisor = 32
  c.max_boxes = 100  # ground-truth rows per image (COCO train2017 has at most 93)
  c.min_image_size = 32  # mmdet's filter_cfg: smaller training images are skipped
  c.aug = ml_collections.ConfigDict({"hflip": 0.5, "multiscale_short": ()})
  c.synthetic = ml_collections.ConfigDict({
      "image_size": 128, "num_train": 2000, "num_val": 500, "max_items": 4,
      "item_size": (24, 72)})

  # Model and loss (pvt_jax/detection: mmdet's RetinaHead settings).
  c.detection = ml_collections.ConfigDict({
      # mmdet's loss normaliser per GPU of 2 images (8 x 2 officially); 0: the whole batch
      "images_per_group": 2,
      "nms_pre": 1000, "score_thr": 0.05, "iou_threshold": 0.5, "max_per_img": 100,
      "num_visualized": 4,  # eval images drawn with their boxes into the workdir
  })

  # Optimisation: AdamW lr 1e-4 at batch 16 (scaled linearly with the batch), weight decay
  # 1e-4 on every parameter (the official config has no exemptions), step schedule.
  c.batch_size = 16
  c.eval_batch_size = 8
  c.num_epochs = 12
  c.optimizer.base_lr = 1e-4
  c.optimizer.lr_batch_base = 16
  c.optimizer.weight_decay = 1e-4
  c.optimizer.decay_all_params = True
  c.optimizer.grad_clip_norm = 0.0
  c.optimizer.schedule = "step"
  c.optimizer.warmup_steps = 500
  c.optimizer.warmup_ratio = 0.001
  c.optimizer.decay_epochs = (8, 11)
  c.optimizer.decay_rate = 0.1
  c.log_every_steps = 50
  c.checkpoint_every_steps = 2000

  if "3x" in modes:
    c.num_epochs = 36
    c.optimizer.decay_epochs = (27, 33)
    c.aug.multiscale_short = (640, 800)
  if "coco" not in modes:
    _quick_fashion_mnist(c)
  if "runlocal" in modes:
    _runlocal(c)
  return c


def _quick_fashion_mnist(c: ml_collections.ConfigDict) -> None:
  """The offline default: the synthetic set at its own size (no resizing), one 64 px canvas with
  garments of 28-56 px (the sizes the stride-8 anchors, 32-50 px, match), B0 from scratch. lr
  1e-3 held after a 50-step warmup (a few hundred steps are too few for the 1x decay to help);
  batch 8. Measured: AP 0.122 (AP50 0.238) after 600 steps; batch 16 x 300 steps gave 0.032."""
  c.dataset = "fashion_mnist"
  c.train_split, c.eval_split = "train", "val"
  c.synthetic.image_size = 64
  c.synthetic.max_items = 3
  c.synthetic.item_size = (28, 56)
  c.image_scale = (64, 64)
  c.canvas_sizes = ((64, 64),)
  c.max_boxes = 8
  c.min_image_size = 1
  c.drop_path_rate = 0.0
  c.batch_size = 8
  c.num_train_steps = 600
  c.optimizer.base_lr = 2e-3  # x batch 8 / 16: lr 1e-3
  c.optimizer.grad_clip_norm = 10.0  # the focal loss spiked once without (lr 1e-3, batch 16)
  c.optimizer.warmup_steps = 50
  c.optimizer.decay_epochs = ()
  c.detection.images_per_group = 0
  c.log_every_steps = 20
  c.eval_every_steps = 200
  c.checkpoint_every_steps = 200


def _runlocal(c: ml_collections.ConfigDict) -> None:
  c.batch_size = 4
  c.eval_batch_size = 4
  c.num_train_steps = 6
  c.synthetic.num_train = 16
  c.synthetic.num_val = 8
  c.optimizer.warmup_steps = 2
  c.log_every_steps = 2
  c.eval_every_steps = 3
  c.checkpoint_every_steps = 3
