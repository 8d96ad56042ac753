"""The PVT v2 paper's ablation (Table 6) as one config per row, for ImageNet-1k training:

  :v1_small  PVT v1-Small                                   (#1, variant v1_small)
  :ope       + overlapping patch embedding, no position embeddings   (#2, v1_small_ope)
  :cffn      ++ convolutional FFN = PVT v2-B2               (#3, b2)
  :lsra      +++ linear SRA = PVT v2-B2-Li                  (#4, b2_li)

then the modes of pvt_jax/configs/classification.py, e.g. `--config=configs/ablation.py:ope,
imagenet`. The rows differ only in the variant's switches (pvt_jax/models/pvt_v2.py `Variant`);
`python -m pvt_jax.ablation` prints their parameters and GFLOPs next to the paper's.
"""

from pvt_jax.configs import classification

ROWS = {"v1_small": "v1_small", "ope": "v1_small_ope", "cffn": "b2", "lsra": "b2_li"}


def get_config(arg=None):
  row, _, modes = (arg or "").partition(",")
  if row not in ROWS:
    raise ValueError(f"unknown Table 6 row {row!r}; choose from {', '.join(ROWS)}")
  return classification.get_config(ROWS[row], modes)
