"""Tests of learnopt.torch use tiny tensors: one intra-op thread is faster than several, and
far faster on a loaded machine, where torch's worker threads wait on each other."""

try:
    import torch
except ImportError:  # the tests skip themselves (pytest.importorskip)
    torch = None

if torch is not None:
    torch.set_num_threads(1)
