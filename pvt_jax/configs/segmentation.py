"""Semantic FPN configs (paper Table 5): the official ADE20K recipe and a quick offline run.

Modes (after the colon of a config file, comma-separated):

  (none)     quick offline run: the Fashion-MNIST segmentation set (garments pasted on 64x64
             canvases, 11 classes with the background; built from the local idx files), from
             scratch (or from a classification checkpoint with --config.init_from); minutes on
             a CPU.
  ade20k     the paper's recipe on ADE20K (`fpn_pvtv2_*_ade20k_40k.py` of whai362/PVTv2-Seg at
             the paper's 4-GPU batch): 512x512 crops, global batch 16, 40k iterations, AdamW lr
             1e-4 and weight decay 1e-4 on every parameter, poly decay (power 0.9, min lr 0),
             drop path 0.1, backbone from an ImageNet checkpoint (set init_from).
             --config.dataset=ade20k:/path/to/ADEChallengeData2016.
  runlocal   shrink whatever was chosen to a smoke test: tiny batches, a handful of steps.

e.g. `--config=configs/sem_fpn.py:b2,ade20k --config.init_from=ckpt/pvt_v2_b2`.
"""

import ml_collections

from pvt_jax.configs import base

MODES = ("ade20k", "runlocal")


def segmentation_fields() -> ml_collections.ConfigDict:
  """The official ADE20K pipeline (mmseg `_base_/datasets/ade20k.py` + PVT's AlignResize)."""
  return ml_collections.ConfigDict({
      # Training: Resize(scale, ratio_range) -> RandomCrop(crop_size, cat_max_ratio) -> flip
      # -> PhotoMetricDistortion -> Normalize -> Pad (image 0, label 255).
      "crop_size": (512, 512), "scale": (2048, 512), "ratio_range": (0.5, 2.0),
      "cat_max_ratio": 0.75, "flip_probability": 0.5, "photometric": True,
      # Whole-image eval: rescale into eval_scale, sides rounded up to size_divisor.
      "eval_scale": (2048, 512), "size_divisor": 32,
      # Eval canvases (one compiled program each): network input rounded up to this multiple
      # (= size_divisor: each image at exactly its official size; larger: fewer programs, more
      # padding the backbone's global attention sees), labels rounded up to the other.
      "eval_canvas_multiple": 32, "eval_label_canvas_multiple": 128,
      # Only for dataset "folder:...": label 0 means "ignore", class k is label k + 1.
      "reduce_zero_label": False,
      # Only for dataset "fashion_mnist_seg".
      "synthetic": {"canvas_size": 64, "num_train": 4000, "num_eval": 500, "seed": 0},
      # FPNHead's Dropout2d before the classifier (the official dropout_ratio).
      "dropout_rate": 0.1,
      # Images with prediction / ground-truth overlays written at each eval.
      "num_overlay_images": 4,
  })


def get_config(variant: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """The Semantic FPN config of `variant` in the modes named by `arg` (module docstring)."""
  _, modes = base.parse_arg(arg, MODES, variant=variant)
  c = base.base_config(variant)
  c.task = "segmentation"
  c.seg = segmentation_fields()
  c.dataset = "ade20k:data/ade/ADEChallengeData2016"  # mmseg's data_root
  c.train_split = "training"
  c.eval_split = "validation"
  c.drop_path_rate = 0.1  # every variant's backbone in PVTv2-Seg's pvtv2.py
  c.batch_size = 16
  c.eval_batch_size = 8
  c.num_train_steps = 40_000
  c.optimizer.base_lr = 1e-4
  c.optimizer.lr_batch_base = 16  # lr = 1e-4 at the paper's batch of 16
  c.optimizer.weight_decay = 1e-4
  c.optimizer.schedule = "poly"  # (lr - min_lr) * (1 - step / steps) ** power + min_lr
  c.optimizer.poly_power = 0.9
  c.optimizer.min_lr = 0.0  # the PVTv2-Seg configs (mmseg's schedule_40k says 1e-4)
  c.optimizer.warmup_epochs = 0.0
  c.optimizer.decay_all_params = True  # mmseg 0.13 AdamW has no paramwise_cfg: norms decay too
  c.optimizer.grad_clip_norm = 0.0
  c.eval_every_steps = 4000
  c.checkpoint_every_steps = 4000
  c.log_every_steps = 50
  if "ade20k" not in modes:
    _quick_fashion_mnist(c)
  if "runlocal" in modes:
    _runlocal(c)
  return c


def _quick_fashion_mnist(c: ml_collections.ConfigDict) -> None:
  """Fashion-MNIST garments on 64x64 canvases, the official pipeline scaled to them (crop 64,
  eval at 64; no class-ratio rejection, the background dominates by design). B0 from scratch
  reaches mIoU 0.361 on the validation canvases (an all-background prediction: 0.063) in 600
  steps, 896 s of CPU time (README, "Semantic segmentation")."""
  c.dataset = "fashion_mnist_seg"
  c.train_split = "train"
  c.eval_split = "validation"
  c.drop_path_rate = 0.0
  c.seg.crop_size = (64, 64)
  c.seg.scale = (64, 64)
  c.seg.ratio_range = (0.75, 1.5)  # garments of 21-84 px; 0.5-2.0 cuts most of them off
  c.seg.eval_scale = (64, 64)
  c.seg.cat_max_ratio = 1.0
  c.seg.eval_label_canvas_multiple = 64
  c.batch_size = 32
  c.eval_batch_size = 100
  c.num_train_steps = 600
  c.optimizer.base_lr = 2e-3  # measured (600 steps, B0 from scratch): mIoU 0.36, 0.30 at 1e-3
  c.optimizer.lr_batch_base = 32
  c.optimizer.weight_decay = 1e-4
  c.log_every_steps = 20
  c.eval_every_steps = 200
  c.checkpoint_every_steps = 200


def _runlocal(c: ml_collections.ConfigDict) -> None:
  """A smoke test of every code path: tiny batches, a few steps."""
  c.batch_size = 4
  c.eval_batch_size = 4
  c.num_train_steps = 6
  c.seg.synthetic.num_train = 16
  c.seg.synthetic.num_eval = 8
  c.log_every_steps = 2
  c.eval_every_steps = 3
  c.checkpoint_every_steps = 3
