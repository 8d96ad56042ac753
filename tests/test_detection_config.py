"""configs/retinanet.py: the official 1x recipe, 3x, the offline default, and the step schedule
against mmengine's LinearLR + MultiStepLR."""

import numpy as np
import pytest

from configs import retinanet
from pvt_jax import detection
from pvt_jax.train import optimizer


def test_coco_mode_is_the_official_recipe():
  c = retinanet.get_config("b2,coco")
  assert (c.task, c.variant, c.dataset, c.drop_path_rate) == (
      "detection", "b2", "coco:data/coco", 0.1)
  assert (c.train_split, c.eval_split, c.image_scale) == ("train2017", "val2017", (1333, 800))
  assert (c.batch_size, c.num_epochs, c.aug.hflip, tuple(c.aug.multiscale_short)) == (
      16, 12, 0.5, ())
  o = c.optimizer
  assert (o.base_lr * c.batch_size / o.lr_batch_base, o.weight_decay, o.decay_all_params) == (
      1e-4, 1e-4, True)
  assert (o.warmup_steps, o.warmup_ratio, tuple(o.decay_epochs), o.decay_rate) == (
      500, 0.001, (8, 11), 0.1)
  d = c.detection
  assert (d.nms_pre, d.score_thr, d.iou_threshold, d.max_per_img) == (1000, 0.05, 0.5, 100)
  settings = detection.RetinaNetSettings.from_config(c)
  assert settings.images_per_group == 2 and settings.inference == detection.InferenceSettings()
  assert settings.assigner == detection.MaxIoUAssigner(0.5, 0.4, 0.0)
  three = retinanet.get_config("b2,coco,3x")
  assert (three.num_epochs, tuple(three.optimizer.decay_epochs)) == (36, (27, 33))
  assert tuple(three.aug.multiscale_short) == (640, 800)


def test_default_is_offline_and_runlocal_is_tiny():
  c = retinanet.get_config()
  assert (c.variant, c.dataset, tuple(map(tuple, c.canvas_sizes))) == (
      "b0", "fashion_mnist", ((64, 64),))
  small = retinanet.get_config("b1,runlocal")
  assert small.variant == "b1" and small.num_train_steps <= 10 and small.batch_size <= 4
  with pytest.raises(ValueError, match="'fast'"):
    retinanet.get_config("b0,fast")


@pytest.mark.torch
def test_schedule_matches_mmengine():
  torch = pytest.importorskip("torch")
  from mmengine.optim.scheduler import LinearLR, MultiStepLR
  c = retinanet.get_config("b0,coco")
  steps_per_epoch = 70
  c.optimizer.warmup_steps = 100
  sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
  # The official run's mmdet 2.x warmup (mmcv's LrUpdaterHook: factor 1 - (1 - i / 100) x 0.999
  # at iteration i < 100) is mmengine's LinearLR ending one iteration later than 3.x configs.
  schedulers = [LinearLR(sgd, start_factor=0.001, by_epoch=False, begin=0, end=101),
                MultiStepLR.build_iter_from_epoch(sgd, milestones=[8, 11], gamma=0.1,
                                                  epoch_length=steps_per_epoch)]
  ours = optimizer.learning_rate_schedule(c, steps_per_epoch, 12 * steps_per_epoch)
  for step in range(12 * steps_per_epoch):
    np.testing.assert_allclose(float(ours(step)), sgd.param_groups[0]["lr"], rtol=1e-5)
    for s in schedulers:
      s.step()
