"""Config files: one per PVT v2 variant plus fine-tuning; the defaults are in pvt_jax/configs/."""
