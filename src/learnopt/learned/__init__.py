"""Learned optimizer architectures."""
