"""Hand-designed optimizers as optax transformations, with their search spaces."""
