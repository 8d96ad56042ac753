"""Training configurations: one file per PVT v2 variant plus fine-tuning (see common.py)."""
