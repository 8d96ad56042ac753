"""Configuration defaults (big_vision style `get_config(arg)`), in the package so that every CLI
works from a pip install; the files in the repository's `configs/` are thin entry points to them.

  base.py            fields every task shares (model, batch, optimizer, mesh, bookkeeping), modes
  classification.py  ImageNet-1k recipe, the quick Fashion-MNIST run, fine-tuning
  segmentation.py    Semantic FPN: the ADE20K recipe of Table 5, the quick offline run
"""
