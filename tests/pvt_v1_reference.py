"""PVT v1 in PyTorch, written from the official `classification/pvt.py` (whai362/PVT): the parity
reference for our v1 variants (timm has no PVT v1). Module and parameter names follow the official
ones, so `state_dict()` has the official checkpoints' keys (`patch_embed1.proj.weight`,
`pos_embed4`, `cls_token`, `block2.0.attn.kv.bias`, `norm.weight`, `head.weight`, ...).

One deliberate difference: the official `_get_pos_embed` keeps a table as it is when the stage's
token count equals stage 1's 224 px count (56 * 56), a slip that only works because resizing a
table to its own size is the identity in every other case it meets at 224 px; here a table is
kept iff the map has the table's own grid, which is the same function wherever the official code
runs, and also at the sizes where it fails (e.g. 448 px, whose stage 2 has 56 * 56 tokens).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch_reference import randomize_biases_and_norms

DEPTHS = {"v1_tiny": (2, 2, 2, 2), "v1_small": (3, 4, 6, 3), "v1_medium": (3, 4, 18, 3),
          "v1_large": (3, 8, 27, 3)}
EMBED_DIMS = (64, 128, 320, 512)
NUM_HEADS = (1, 2, 5, 8)
MLP_RATIOS = (8, 8, 4, 4)
SR_RATIOS = (8, 4, 2, 1)


class Mlp(nn.Module):
  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(F.gelu(self.fc1(x)))


class Attention(nn.Module):
  """Spatial-reduction attention on [B, N, C] tokens of an H x W map (N = H*W, or 1 + H*W with a
  class token, which the official model only has where sr_ratio is 1)."""

  def __init__(self, dim, num_heads, sr_ratio):
    super().__init__()
    self.num_heads = num_heads
    self.q = nn.Linear(dim, dim)
    self.kv = nn.Linear(dim, 2 * dim)
    self.proj = nn.Linear(dim, dim)
    self.sr_ratio = sr_ratio
    if sr_ratio > 1:
      self.sr = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio)
      self.norm = nn.LayerNorm(dim)  # eps 1e-5: the official model leaves this one at default

  def forward(self, x, h, w):
    b, n, c = x.shape
    heads, d = self.num_heads, c // self.num_heads
    q = self.q(x).reshape(b, n, heads, d).transpose(1, 2)
    source = x
    if self.sr_ratio > 1:
      source = self.sr(x.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2)
      source = self.norm(source)
    k, v = self.kv(source).reshape(b, -1, 2, heads, d).permute(2, 0, 3, 1, 4)
    attn = (q @ k.transpose(-2, -1) * d**-0.5).softmax(dim=-1)
    return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
  def __init__(self, dim, num_heads, mlp_ratio, sr_ratio):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = Attention(dim, num_heads, sr_ratio)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.mlp = Mlp(dim, dim * mlp_ratio)

  def forward(self, x, h, w):
    x = x + self.attn(self.norm1(x), h, w)
    return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
  """Non-overlapping patches: a conv with kernel = stride, then LayerNorm (eps 1e-5)."""

  def __init__(self, in_chans, dim, patch):
    super().__init__()
    self.proj = nn.Conv2d(in_chans, dim, patch, stride=patch)
    self.norm = nn.LayerNorm(dim)

  def forward(self, x):
    x = self.proj(x)
    h, w = x.shape[2:]
    return self.norm(x.flatten(2).transpose(1, 2)), h, w


def resize_position_embedding(table, grid, h, w):
  """A [1, grid*grid, C] table as the official `_get_pos_embed` resizes it to an h x w map."""
  if (h, w) == (grid, grid):
    return table
  square = table.reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
  return F.interpolate(square, size=(h, w), mode="bilinear").reshape(1, -1, h * w).permute(0, 2, 1)


class PyramidVisionTransformer(nn.Module):
  """PVT v1 classifier; `stage_maps` gives the four maps of the official detection backbone."""

  def __init__(self, depths, num_classes=1000, img_size=224):
    super().__init__()
    self.grids = [img_size // (4 * 2**i) for i in range(4)]
    for i in range(4):
      dim = EMBED_DIMS[i]
      setattr(self, f"patch_embed{i + 1}",
              PatchEmbed(3 if i == 0 else EMBED_DIMS[i - 1], dim, 4 if i == 0 else 2))
      rows = self.grids[i]**2 + (i == 3)  # stage 4's first row is the class token's
      setattr(self, f"pos_embed{i + 1}", nn.Parameter(torch.zeros(1, rows, dim)))
      setattr(self, f"block{i + 1}", nn.ModuleList(
          Block(dim, NUM_HEADS[i], MLP_RATIOS[i], SR_RATIOS[i]) for _ in range(depths[i])))
    self.norm = nn.LayerNorm(EMBED_DIMS[3], eps=1e-6)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, EMBED_DIMS[3]))
    self.head = nn.Linear(EMBED_DIMS[3], num_classes) if num_classes else nn.Identity()

  def _stage(self, i, x, class_token):
    x, h, w = getattr(self, f"patch_embed{i + 1}")(x)
    table = getattr(self, f"pos_embed{i + 1}")
    if i == 3:
      first, table = table[:, :1], table[:, 1:]
    x = x + resize_position_embedding(table, self.grids[i], h, w)
    if class_token:
      x = torch.cat([(self.cls_token + first).expand(x.shape[0], -1, -1), x], dim=1)
    for block in getattr(self, f"block{i + 1}"):
      x = block(x, h, w)
    return x, h, w

  def stage_maps(self, x):
    """NCHW maps of the four stages, un-normalised and without the class token."""
    maps = []
    for i in range(4):
      x, h, w = self._stage(i, x, class_token=False)
      x = x.transpose(1, 2).reshape(x.shape[0], -1, h, w)
      maps.append(x)
    return maps

  def forward(self, x):
    for i in range(3):
      x, h, w = self._stage(i, x, class_token=False)
      x = x.transpose(1, 2).reshape(x.shape[0], -1, h, w)
    x, _, _ = self._stage(3, x, class_token=True)
    return self.head(self.norm(x)[:, 0])


def random_model(variant, num_classes=1000, seed=0):
  """The reference with every parameter random (norms, biases and position tables included), in
  eval mode; the head scaled so logits are O(1)."""
  torch.manual_seed(seed)
  model = PyramidVisionTransformer(DEPTHS[variant], num_classes)
  randomize_biases_and_norms(model)
  with torch.no_grad():
    for name, param in model.named_parameters():
      if name.endswith(".bias") or param.ndim == 1:
        continue
      if name.startswith(("pos_embed", "cls_token")):
        param.normal_(0.0, 0.5)
      else:
        param.normal_(0.0, 1.0 / math.sqrt(param[0].numel()))
  return model.eval()
