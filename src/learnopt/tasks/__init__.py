"""Tasks: the task contract, datasets, fixed tasks and sampled families."""
