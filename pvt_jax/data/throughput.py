"""Input-pipeline images/s of pvt_jax against timm's DataLoader, side by side in one process.

  python -m pvt_jax.benchmark --pipeline [--folder=DIR] --output_dir=/tmp/bench

Both read the same ImageFolder of JPEGs (made here when none is given: ImageNet-sized, photo-like
content). Train: the official recipe (timm `create_transform` with the PVT/DeiT arguments,
torchvision ImageFolder, DataLoader with one worker per core, RepeatAugSampler x3, timm `Mixup`)
against `pipeline.train_iterator`; eval: resize 256, centre crop 224, bicubic, against
`pipeline.eval_iterator`. The pipelines are timed in alternating rounds so that both see the same
machine load; each round first drains the batches a pipeline buffered while the other one ran.

Importing this module loads TensorFlow (pvt_jax.data) and timm: timm must come first (it
segfaults when imported after TensorFlow here, see tests/conftest.py), so import timm before
anything of pvt_jax.data, as `pvt_jax.benchmark` does.
"""

import dataclasses
import itertools
import json
import os
import statistics
import time

import numpy as np
import psutil
import timm.data
import timm.data.auto_augment
import torch
import torchvision
from PIL import Image, ImageDraw, ImageOps
from timm.data.distributed_sampler import RepeatAugSampler

from pvt_jax.configs import classification
from pvt_jax.data.errors import DatasetError

SHORT_SIDE = (333, 500)  # ImageNet's typical range
JPEG_QUALITY = 90


@dataclasses.dataclass(frozen=True)
class Settings:
  folder: str | None  # ImageFolder root with a train/ split; None: make one in output_dir
  num_images: int  # of the folder made here
  num_classes: int
  image_size: int
  batch_size: int
  rounds: int
  batches_per_round: int
  drain_batches: int  # untimed at the start of each round (what was buffered meanwhile)
  short_side: tuple[int, int] = SHORT_SIDE


def _photo(rng: np.random.Generator, height: int, width: int) -> Image.Image:
  """Photo-like content: coloured 1/f noise over 8 octaves (natural images' spectrum), sharp
  shapes and sensor-like grain, so that JPEG sizes and decode costs resemble real photos'."""
  x = np.zeros((height, width, 3), np.float32)
  for octave in range(8):
    scale = 2 ** octave
    small = rng.standard_normal((max(height // scale, 2), max(width // scale, 2), 3), np.float32)
    if scale > 1:
      small = np.stack([np.asarray(Image.fromarray(small[..., c]).resize(
          (width, height), Image.BILINEAR)) for c in range(3)], -1)
    x += small * scale ** 0.8
  x = x @ (rng.standard_normal((3, 3), np.float32) * 0.3 + np.eye(3, dtype=np.float32))
  x = (x - x.mean((0, 1))) / x.std((0, 1))
  x = 120 + 50 * x + rng.standard_normal(x.shape, np.float32) * 16
  image = Image.fromarray(np.clip(x, 0, 255).astype(np.uint8))
  draw = ImageDraw.Draw(image)
  for _ in range(6):
    x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
    box = [x0, y0, x0 + int(rng.integers(20, width // 2)), y0 + int(rng.integers(20, height // 2))]
    fill = tuple(int(v) for v in rng.integers(0, 256, 3))
    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
  return image


def make_jpeg_folder(root: str, num_images: int, num_classes: int, seed: int = 0,
                     short_side: tuple[int, int] = SHORT_SIDE) -> str:
  """root/train/<class>/*.jpg: `num_images` JPEGs (quality 90), short side uniform in
  `short_side`, aspect 1.2-1.5, a third of them portrait. Kept when already complete."""
  train = os.path.join(root, "train")
  names = [os.path.join(train, f"class{i % num_classes:03d}", f"img{i:05d}.jpg")
           for i in range(num_images)]
  if all(os.path.exists(n) for n in names):
    return root
  rng = np.random.default_rng(seed)
  for i, name in enumerate(names):
    os.makedirs(os.path.dirname(name), exist_ok=True)
    short = int(rng.integers(short_side[0], short_side[1] + 1))
    long = int(short * rng.uniform(1.2, 1.5))
    height, width = (long, short) if i % 3 == 0 else (short, long)
    _photo(rng, height, width).save(name + ".part", "JPEG", quality=JPEG_QUALITY)
    os.replace(name + ".part", name)
  return root


def _posterize_to_zero_bits(img, bits_to_keep, **_):
  """timm's posterize as Pillow < 12 ran it: Pillow 12 rejects bits_to_keep=0, which timm's
  PosterizeIncreasing asks for at magnitudes above 9.375 (rand-m9-mstd0.5 draws them); old
  Pillow returned black then, as ours does."""
  if bits_to_keep >= 8:
    return img
  if bits_to_keep <= 0:
    return img.point([0] * 256 * len(img.getbands()))
  return ImageOps.posterize(img, int(bits_to_keep))


def timm_train_batches(folder: str, s: Settings, workers: int):
  """The official training input: DeiT's build_transform(is_training=True) via timm, repeated
  augmentation x3, DataLoader with `workers` processes, Mixup in the main process (as DeiT)."""
  for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
    timm.data.auto_augment.NAME_TO_OP[name] = _posterize_to_zero_bits
  transform = timm.data.create_transform(
      s.image_size, is_training=True, color_jitter=0.4, auto_augment="rand-m9-mstd0.5-inc1",
      interpolation="bicubic", re_prob=0.25, re_mode="pixel", re_count=1)
  dataset = torchvision.datasets.ImageFolder(os.path.join(folder, "train"), transform)
  sampler = RepeatAugSampler(dataset, num_replicas=1, rank=0, num_repeats=3)
  loader = torch.utils.data.DataLoader(dataset, s.batch_size, sampler=sampler,
                                       num_workers=workers, drop_last=True,
                                       persistent_workers=workers > 0)
  mixup = timm.data.Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5,
                          mode="batch", label_smoothing=0.1, num_classes=len(dataset.classes))
  for epoch in itertools.count():
    sampler.set_epoch(epoch)
    for images, labels in loader:
      yield mixup(images, labels)


def timm_eval_batches(folder: str, s: Settings, workers: int):
  """DeiT's eval transform: resize int(224 / 0.875) = 256 (bicubic), centre crop, normalise."""
  size = s.image_size
  transform = torchvision.transforms.Compose([
      torchvision.transforms.Resize(int(size / 0.875),
                                    interpolation=torchvision.transforms.InterpolationMode.BICUBIC),
      torchvision.transforms.CenterCrop(size),
      torchvision.transforms.ToTensor(),
      torchvision.transforms.Normalize(timm.data.IMAGENET_DEFAULT_MEAN,
                                       timm.data.IMAGENET_DEFAULT_STD)])
  dataset = torchvision.datasets.ImageFolder(os.path.join(folder, "train"), transform)
  loader = torch.utils.data.DataLoader(dataset, s.batch_size, num_workers=workers,
                                       drop_last=True, persistent_workers=workers > 0)
  while True:
    yield from loader


def pvt_jax_config(folder: str, s: Settings):
  """The classification config of the official recipe over `folder` (train split also eval)."""
  config = classification.get_config("b0", "imagenet")
  config.dataset = f"folder:{folder}"
  config.image_size = s.image_size
  config.batch_size = s.batch_size
  config.eval_batch_size = s.batch_size
  config.eval_split = "train"
  return config


def pvt_jax_train_batches(config):
  from pvt_jax.data import pipeline
  yield from pipeline.train_iterator(config)


def pvt_jax_eval_batches(config):
  from pvt_jax.data import pipeline
  while True:
    yield from pipeline.eval_iterator(config)


def _batch_len(batch) -> int:
  images = batch["image"] if isinstance(batch, dict) else batch[0]
  return len(images)


def _cpu_seconds() -> float:
  """CPU time of this process (all its threads: tf.data's pool) and its children (timm's
  DataLoader workers): what a pipeline costs, whatever else runs on the machine."""
  me = psutil.Process()
  total = sum(me.cpu_times()[:2])
  for child in me.children(recursive=True):
    try:
      total += sum(child.cpu_times()[:2])
    except psutil.NoSuchProcess:
      pass
  return total


def time_alternately(streams: dict, s: Settings) -> dict:
  """{name: {'img_per_s': [per round], 'cpu_ms_per_img': [per round]}} of iterators timed in
  turns (order alternating per round)."""
  for stream in streams.values():  # start-up (workers, tf.data graphs, first shuffle buffer)
    for _ in range(s.drain_batches + 1):
      next(stream)
  rates = {name: {"img_per_s": [], "cpu_ms_per_img": []} for name in streams}
  names = list(streams)
  for r in range(s.rounds):
    for name in (names if r % 2 == 0 else names[::-1]):
      stream = streams[name]
      for _ in range(s.drain_batches):
        next(stream)
      cpu, start = _cpu_seconds(), time.perf_counter()
      images = sum(_batch_len(next(stream)) for _ in range(s.batches_per_round))
      wall, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
      rates[name]["img_per_s"].append(images / wall)
      rates[name]["cpu_ms_per_img"].append(1e3 * cpu / images)
  return rates


def _summary(rounds: dict, cores: int) -> dict:
  median = statistics.median(rounds["img_per_s"])
  cpu_ms = statistics.median(rounds["cpu_ms_per_img"])
  return {"img_per_s": median, "img_per_s_per_core": median / cores,
          "cpu_ms_per_img": cpu_ms, "img_per_cpu_s": 1e3 / cpu_ms, "rounds": rounds}


def compare(s: Settings, output_dir: str) -> dict:
  """Train and eval pipelines of pvt_jax and timm, timed alternately; results as a dict."""
  cores = len(os.sched_getaffinity(0))
  folder = s.folder or make_jpeg_folder(os.path.join(output_dir, "jpeg_folder"), s.num_images,
                                        s.num_classes, short_side=s.short_side)
  if not os.path.isdir(os.path.join(folder, "train")):
    raise DatasetError(f"--folder {folder} has no train/ split (expected {folder}/train/<class>/"
                     f"*.jpg)")
  config = pvt_jax_config(folder, s)
  load = os.getloadavg()[0]
  results = {"folder": folder, "cores": cores, "load_average_start": load,
             "settings": dataclasses.asdict(s)}
  # timm's DataLoader workers are forked (as in timm's train.py) before pvt_jax starts JAX's and
  # tf.data's threads: a fork of a process running them could deadlock the child.
  timm_streams = {"train": timm_train_batches(folder, s, cores),
                  "eval": timm_eval_batches(folder, s, cores)}
  for stream in timm_streams.values():
    next(stream)
  for mode, ours in (("train", pvt_jax_train_batches), ("eval", pvt_jax_eval_batches)):
    rates = time_alternately({"pvt_jax": ours(config), "timm": timm_streams[mode]}, s)
    results[mode] = {name: _summary(r, cores) for name, r in rates.items()}
    ours_r, timm_r = results[mode]["pvt_jax"], results[mode]["timm"]
    results[mode]["ratio"] = ours_r["img_per_s"] / timm_r["img_per_s"]
    results[mode]["cpu_ratio"] = timm_r["cpu_ms_per_img"] / ours_r["cpu_ms_per_img"]
  results["load_average_end"] = os.getloadavg()[0]
  return results


def markdown(results: dict, command: str) -> str:
  """The README's pipeline table."""
  st = results["settings"]
  lines = [f"Command: `{command}`", "",
           f"Machine: {results['cores']} cores, load average {results['load_average_start']:.1f}"
           f" at start, {results['load_average_end']:.1f} at end; {st['num_images']} JPEGs "
           f"(or --folder), batch {st['batch_size']}, {st['image_size']} px; medians of "
           f"{st['rounds']} alternating rounds of {st['batches_per_round']} batches. CPU ms/img: "
           "CPU time of the pipeline's threads and worker processes per image (what it costs per "
           "core, whatever else loads the machine).", "",
           "| pipeline | pvt_jax img/s | timm img/s | ratio | pvt_jax CPU ms/img | timm CPU ms/img "
           "| ratio per CPU second |",
           "|---|---|---|---|---|---|---|"]
  for mode in ("train", "eval"):
    r = results[mode]
    lines.append(f"| {mode} | {r['pvt_jax']['img_per_s']:.1f} | {r['timm']['img_per_s']:.1f} "
                 f"| {r['ratio']:.2f}x | {r['pvt_jax']['cpu_ms_per_img']:.2f} "
                 f"| {r['timm']['cpu_ms_per_img']:.2f} | {r['cpu_ratio']:.2f}x |")
  return "\n".join(lines) + "\n"


def settings(quick: bool, folder: str | None, num_images: int) -> Settings:
  """The issue's measurement (batch 64, 224 px), or a tiny one for tests (`quick`)."""
  if quick:
    return Settings(folder, num_images=12, num_classes=2, image_size=64, batch_size=4, rounds=2,
                    batches_per_round=1, drain_batches=1, short_side=(70, 90))
  return Settings(folder, num_images=num_images, num_classes=10, image_size=224, batch_size=64,
                  rounds=5, batches_per_round=4, drain_batches=3)


def run(s: Settings, output_dir: str, command: str) -> dict:
  """`compare`, written to output_dir/pipeline.json and pipeline.md (printed too)."""
  os.makedirs(output_dir, exist_ok=True)
  results = compare(s, output_dir)
  results["command"] = command
  with open(os.path.join(output_dir, "pipeline.json"), "w") as f:
    json.dump(results, f, indent=1)
  table = markdown(results, command)
  with open(os.path.join(output_dir, "pipeline.md"), "w") as f:
    f.write(table)
  print(table)
  return results
