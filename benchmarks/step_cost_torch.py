"""Step cost of the PyTorch learned optimizers (learnopt.torch) relative to torch.optim.Adam.

The PyTorch counterpart of ``benchmarks/step_cost.py`` (Metz et al. 2022, "Practical tradeoffs
between memory, compute, and performance in learned optimizers", arXiv:2203.11860, §4.1-4.3
measure a learned optimizer's overhead against Adam). Optimizers: ``torch.optim.Adam``
(lr 1e-3, its default implementation, on CPU a per-tensor loop of in-place operations: the
reference), ``small_fc_lopt`` (bare, the
shipped general theta), ``small_fc_lopt_general`` as ``learnopt.torch.pretrained`` returns it
(behind the divergence guard), ``fc_lopt`` and ``nn_adam`` (random theta: the cost does not
depend on its values). Tasks: the 784-128-10 ReLU MLP at batch 128 (101,770 parameters), a
small ConvNet (3x3 convs 16-32-32 on 16x16x1 images, batch 64) and a small Transformer
encoder LM (2 layers, d_model 64, 2 heads, vocabulary 64, sequence 32, batch 16).

Two timings per optimizer: ``step`` (``opt.step()`` alone, gradients already in ``.grad``;
the guarded optimizer gets ``loss=``) and ``train_step`` (zero_grad, forward, backward and
step). Timed calls go round-robin across optimizers, so drift on a shared machine hits all
alike; each ratio to Adam is the median over rounds of the same-round ratio. State bytes are
the tensors of ``opt.state`` (guard snapshots included). One CPU thread unless ``--threads``.

Usage: ``python benchmarks/step_cost_torch.py [--quick] [--tasks mlp,conv,transformer]``;
writes ``benchmarks/results/step_cost_torch.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

import learnopt.torch as lt
from learnopt.torch.weights import read_pretrained

OUT = Path(__file__).parent / "results" / "step_cost_torch.json"


def _theta(name: str) -> dict:
    g = np.random.default_rng(0)
    if name == "fc_lopt":
        sizes = (19, 32, 32, 2)
        th = {}
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            th[f"w{i}"] = (g.normal(size=(a, b)) / np.sqrt(a)).astype(np.float32)
            th[f"b{i}"] = np.zeros(b, np.float32)
        return th
    h = 32
    return {"lstm": {"w": (g.normal(size=(19 + h, 4 * h)) / np.sqrt(19 + h)).astype(np.float32),
                     "b": np.zeros(4 * h, np.float32)},
            "out": {"w": np.zeros((h, 4), np.float32), "b": np.zeros(4, np.float32)},
            "initial_hparams": np.asarray([0.1 * np.log(1e-4), 0.1 * np.log(0.1),
                                           0.1 * np.log(1e-3), 0.1 * np.log(1e-8)], np.float32),
            "initial_state": {"h": np.zeros(h, np.float32), "c": np.zeros(h, np.float32)}}


OPTIMIZERS = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-3),
    "small_fc_lopt": lambda ps: lt.TorchSmallFcLOpt(ps, read_pretrained("small_fc_lopt_general")[1],
                                               1000),
    "small_fc_lopt_general (guarded)": lambda ps: lt.pretrained("small_fc_lopt_general", ps, 1000),
    "fc_lopt": lambda ps: lt.TorchFcLOpt(ps, _theta("fc_lopt"), 1000),
    "nn_adam": lambda ps: lt.TorchNNAdam(ps, _theta("nn_adam"), 1000),
}


class TinyLM(torch.nn.Module):
    def __init__(self, vocab=64, d=64, heads=2, layers=2, seq=32):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d)
        self.pos = torch.nn.Parameter(torch.zeros(seq, d))
        layer = torch.nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True)
        self.body = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = torch.nn.Linear(d, vocab)
        self.mask = torch.nn.Transformer.generate_square_subsequent_mask(seq)

    def forward(self, x):
        return self.head(self.body(self.emb(x) + self.pos, mask=self.mask, is_causal=True))


def _task(name: str):
    g = torch.Generator().manual_seed(0)
    if name == "mlp":
        model = torch.nn.Sequential(torch.nn.Linear(784, 128), torch.nn.ReLU(),
                                    torch.nn.Linear(128, 10))
        x, y = torch.randn(128, 784, generator=g), torch.randint(0, 10, (128,), generator=g)
        return model, lambda m: torch.nn.functional.cross_entropy(m(x), y)
    if name == "conv":
        model = torch.nn.Sequential(
            torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(32, 32, 3, stride=2, padding=1), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 10))
        x, y = torch.randn(64, 1, 16, 16, generator=g), torch.randint(0, 10, (64,), generator=g)
        return model, lambda m: torch.nn.functional.cross_entropy(m(x), y)
    model = TinyLM()
    tok = torch.randint(0, 64, (16, 33), generator=g)
    return model, lambda m: torch.nn.functional.cross_entropy(
        m(tok[:, :-1]).reshape(-1, 64), tok[:, 1:].reshape(-1))


def _bench_task(task: str, repeats: int, inner: int) -> dict:
    setups = {}
    for name, make in OPTIMIZERS.items():
        torch.manual_seed(0)
        model, loss_fn = _task(task)
        opt = make(list(model.parameters()))
        guarded = getattr(opt, "guard", None) is not None

        def train_step(model=model, loss_fn=loss_fn, opt=opt, guarded=guarded):
            opt.zero_grad()
            loss = loss_fn(model)
            loss.backward()
            opt.step(loss=loss.detach()) if guarded else opt.step()

        train_step()  # warm up, state created, gradients in .grad
        loss0 = loss_fn(model).detach()

        def step(opt=opt, guarded=guarded, loss0=loss0):
            opt.step(loss=loss0) if guarded else opt.step()

        setups[name] = (opt, step, train_step)
    times = {n: {"step": [], "train_step": []} for n in setups}
    for _ in range(repeats):
        for kind in ("step", "train_step"):
            for name, (_, step, train_step) in setups.items():
                fn = step if kind == "step" else train_step
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                times[name][kind].append((time.perf_counter() - t0) / inner)
    n_params = sum(p.numel() for p in setups["adam"][0].param_groups[0]["params"])
    out = {"num_params": int(n_params), "optimizers": {}}
    for name, (opt, _, _) in setups.items():
        row = {}
        for kind in ("step", "train_step"):
            ratios = [a / b for a, b in zip(times[name][kind], times["adam"][kind], strict=True)]
            row[f"{kind}_ms"] = 1e3 * statistics.median(times[name][kind])
            row[f"{kind}_ratio_to_adam"] = statistics.median(ratios)
        if isinstance(opt, lt.TorchLearnedOptimizer):
            nbytes = opt.state_bytes()
        else:
            nbytes = sum(v.numel() * v.element_size() for s in opt.state.values()
                         for v in s.values() if isinstance(v, torch.Tensor))
        row["state_bytes"] = int(nbytes)
        row["state_floats_per_param"] = nbytes / 4 / n_params
        out["optimizers"][name] = row
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--tasks", default="mlp,conv,transformer")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    repeats, inner = (5, 5) if args.quick else (15, 10)
    load0 = os.getloadavg()
    result = {"torch": torch.__version__, "python": sys.version.split()[0],
              "platform": platform.platform(), "cpu_count": os.cpu_count(),
              "threads": args.threads, "repeats": repeats, "inner": inner,
              "loadavg_start": load0, "tasks": {}}
    for task in args.tasks.split(","):
        result["tasks"][task] = _bench_task(task, repeats, inner)
        for name, row in result["tasks"][task]["optimizers"].items():
            print(f"{task:12s} {name:34s} step {row['step_ms']:7.3f} ms "
                  f"x{row['step_ratio_to_adam']:5.2f}  train_step x"
                  f"{row['train_step_ratio_to_adam']:5.2f}  state "
                  f"{row['state_floats_per_param']:.2f} floats/param")
    result["loadavg_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
