"""Meta-training: unrolls, gradient estimators, the outer learner, the training loop."""
