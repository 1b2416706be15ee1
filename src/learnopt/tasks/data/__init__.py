"""Offline datasets: loaders and the data registry."""
