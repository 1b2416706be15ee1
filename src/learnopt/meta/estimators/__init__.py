"""Meta-gradient estimators."""
