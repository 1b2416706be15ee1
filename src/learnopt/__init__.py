"""learnopt: learned optimizers in JAX.

Tasks (:mod:`learnopt.tasks`), hand-designed (:mod:`learnopt.optimizers`) and learned
(:mod:`learnopt.learned`) optimizers that are all optax transformations, the one inner step
(:mod:`learnopt.step`), meta-training (:mod:`learnopt.meta`), benchmarks (:mod:`learnopt.bench`)
and shipped optimizers (:mod:`learnopt.pretrained`). The layers and the data flow are described
in docs/architecture.md of the repository.
"""

__version__ = "0.1.0"

# Before jax creates its CPU client: jaxlib 0.10.0-0.11.0 can deadlock in batched LAPACK calls
# (docs/hangs.md); on those versions this sets PJRT_NPROC=1 unless the user set it, NPROC or
# LEARNOPT_XLA_WORKAROUND=0. XLA_WORKAROUND says what was done (None: nothing).
from learnopt.watchdog import apply_xla_workaround as _apply_xla_workaround  # noqa: E402

XLA_WORKAROUND = _apply_xla_workaround()
