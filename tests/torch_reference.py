"""Test helpers: timm PVT v2 models with random weights, and their state dicts in the official,
timm and HF layouts built from the key tables in data/checkpoint_keys (not from pvt_jax code)."""

import csv
import math
import os

import numpy as np
import safetensors.numpy
import timm
import torch

KEY_TABLES = os.path.join(os.path.dirname(__file__), "data", "checkpoint_keys")
HF_KV = "{key,value}(split rows [:D]/[D:])"


def key_table(variant):
  """Rows {official, shape, timm, hf_transformers} of keys_<variant>_3way.tsv."""
  with open(os.path.join(KEY_TABLES, f"keys_{variant}_3way.tsv"), newline="") as f:
    rows = list(csv.DictReader(f, delimiter="\t"))
  for row in rows:
    row["shape"] = tuple(int(n) for n in row["shape"].strip("[]").split(","))
  return rows


def hf_names(row):
  """HF key(s) of one table row: two for the split key/value."""
  name = row["hf_transformers"]
  if HF_KV in name:
    return name.replace(HF_KV, "key"), name.replace(HF_KV, "value")
  return (name,)


def randomize_biases_and_norms(model):
  """Biases ~ N(0, 0.05) and LayerNorm weights ~ N(1, 0.2), in place: init's zeros and ones
  would hide a bias or scale that is dropped or misplaced."""
  with torch.no_grad():
    for name, param in model.named_parameters():
      if name.endswith(".bias"):
        param.normal_(0.0, 0.05)
      elif param.ndim == 1:  # LayerNorm weights
        param.normal_(1.0, 0.2)


def random_timm_model(variant, num_classes=1000, seed=0):
  """timm pvt_v2_<variant> in eval mode with every parameter random, norms and biases included;
  the head is scaled so logits are O(1) (timm's init would make them ~1e-2)."""
  torch.manual_seed(seed)
  model = timm.create_model(f"pvt_v2_{variant}", pretrained=False, num_classes=num_classes)
  randomize_biases_and_norms(model)
  with torch.no_grad():
    if num_classes:
      model.head.weight.normal_(0.0, 1.0 / math.sqrt(model.head.in_features))
  return model.eval()


def state_dict_in(layout, model, variant):
  """The model's weights (numpy) under the key names of `layout`, following the key table."""
  timm_state = {key: value.numpy() for key, value in model.state_dict().items()}
  out = {}
  for row in key_table(variant):
    if row["timm"] not in timm_state:  # the head of a headless model
      continue
    value = timm_state.pop(row["timm"])
    if layout == "timm":
      out[row["timm"]] = value
    elif layout == "official":
      out[row["official"]] = value
    else:
      names = hf_names(row)
      for name, rows in zip(names, np.split(value, len(names)), strict=True):
        out[name] = rows
  assert not timm_state, f"timm keys missing from the key table: {sorted(timm_state)[:3]}"
  return out


def save(path, state_dict, wrap=None):
  """Writes .safetensors, or a torch pickle (optionally wrapped as {wrap: state_dict})."""
  arrays = {key: np.ascontiguousarray(value) for key, value in state_dict.items()}
  if str(path).endswith(".safetensors"):
    safetensors.numpy.save_file(arrays, str(path))
  else:
    tensors = {key: torch.from_numpy(value) for key, value in arrays.items()}
    torch.save({wrap: tensors, "epoch": 299} if wrap else tensors, path)
  return path


def timm_outputs(model, images_nhwc):
  """(logits, [4 stage maps NHWC]) of a timm model for NHWC numpy images."""
  x = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))
  with torch.no_grad():
    final, maps = model.forward_intermediates(x)
    logits = model.forward_head(final)
  return logits.numpy(), [m.numpy().transpose(0, 2, 3, 1) for m in maps]
