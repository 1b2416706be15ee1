"""Pretrained learned optimizers shipped with the package."""
