"""learnopt: learned optimizers in JAX.

Tasks (:mod:`learnopt.tasks`), hand-designed (:mod:`learnopt.optimizers`) and learned
(:mod:`learnopt.learned`) optimizers that are all optax transformations, the one inner step
(:mod:`learnopt.step`), meta-training (:mod:`learnopt.meta`), benchmarks (:mod:`learnopt.bench`)
and shipped optimizers (:mod:`learnopt.pretrained`). The layers and the data flow are described
in docs/architecture.md of the repository.
"""

__version__ = "0.1.0"
