"""PVT v2 checkpoints: official / timm / HF PyTorch weights <-> our Flax params, and orbax I/O.

  conversion = convert_file("pvt_v2_b2.pth")          # validated params + detected variant
  save_converted("b2_converted", conversion.params, metadata)
  model, variables = load_pretrained("b2_converted")  # or directly a .pth/.safetensors file
  ckpt = load_converted("b2_converted")                # params + metadata, e.g. for init_from
  params = replace_head(ckpt.params, num_classes=10, rng=jax.random.key(0))

Dense checkpoints (mmseg Semantic FPN, mmdet RetinaNet; `dense.py`) convert with `convert_any_file`
into {'params', 'batch_stats'}; `with_backbone` puts a classification checkpoint's weights into a
dense model's backbone (the paper's ImageNet initialisation).
"""

from pvt_jax.checkpoints.conversion import (
    Conversion,
    convert_file,
    convert_state_dict,
    detect_variant,
    export_state_dict,
)
from pvt_jax.checkpoints.dense import (
    DENSE_LAYOUTS,
    DenseConversion,
    convert_any_file,
    with_backbone,
)
from pvt_jax.checkpoints.errors import CheckpointError
from pvt_jax.checkpoints.files import read_state_dict, sha256, write_state_dict
from pvt_jax.checkpoints.layouts import FORMATS, detect_format
from pvt_jax.checkpoints.store import (
    FORMAT_VERSION,
    METADATA_KEYS,
    ConvertedCheckpoint,
    load_converted,
    load_pretrained,
    num_head_classes,
    replace_head,
    save_converted,
)

__all__ = [
    "DENSE_LAYOUTS", "FORMATS", "FORMAT_VERSION", "METADATA_KEYS", "CheckpointError",
    "Conversion", "ConvertedCheckpoint", "DenseConversion", "convert_any_file", "convert_file",
    "convert_state_dict", "detect_format", "detect_variant", "export_state_dict",
    "load_converted", "load_pretrained", "num_head_classes", "read_state_dict", "replace_head",
    "save_converted", "sha256", "with_backbone", "write_state_dict",
]
