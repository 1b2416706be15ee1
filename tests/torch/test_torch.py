"""learnopt.torch without JAX: import, training a torch model, state_dict, errors."""

from __future__ import annotations

import copy
import io
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import learnopt.torch as lt  # noqa: E402
from learnopt.torch.weights import read_pretrained  # noqa: E402

NAMES = lt.available()


def _theta(name: str, seed: int = 0) -> dict:
    """A theta of the right shapes for an architecture, without JAX."""
    g = np.random.default_rng(seed)
    if name == "small_fc_lopt":
        return read_pretrained("small_fc_lopt_general")[1]
    if name == "fc_lopt":
        sizes = (19, 32, 32, 2)
        th = {}
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            th[f"w{i}"] = g.normal(size=(a, b)).astype(np.float32) / np.sqrt(a)
            th[f"b{i}"] = np.zeros(b, np.float32)
        return th
    h = 32
    return {"lstm": {"w": g.normal(size=(19 + h, 4 * h)).astype(np.float32) / np.sqrt(19 + h),
                     "b": np.zeros(4 * h, np.float32)},
            "out": {"w": 0.5 * g.normal(size=(h, 4)).astype(np.float32),
                    "b": np.zeros(4, np.float32)},
            "initial_hparams": np.asarray([0.1 * np.log(1e-3), 0.1 * np.log(0.1),
                                           0.1 * np.log(1e-3), 0.1 * np.log(1e-8)], np.float32),
            "initial_state": {"h": np.zeros(h, np.float32), "c": np.zeros(h, np.float32)}}


def _make(kind: str, params, num_steps: int = 100, guard=None):
    if kind in lt.ARCHITECTURES:
        return lt.from_theta(kind, params, _theta(kind), num_steps, guard=guard)
    return lt.pretrained(kind, params, num_steps, guard=guard)


KINDS = ["small_fc_lopt", "fc_lopt", "nn_adam", *NAMES]


class Net(torch.nn.Module):
    """Conv2d (4-D kernel) + Linear (matrix, vector) + a scalar: every rank."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4 * 6 * 6, 3)
        self.temp = torch.nn.Parameter(torch.tensor(1.0))

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1)) * self.temp


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 1, 6, 6, generator=g)
    y = (x[:, 0, :3, :3].sum((1, 2)) > 0).long() + (x[:, 0, 3:, 3:].sum((1, 2)) > 1).long()
    return x, y


def _closure(model, opt, x, y):
    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return closure


def test_import_does_not_import_jax():
    code = ("import sys, torch, learnopt.torch as lt\n"
            "m = torch.nn.Linear(3, 2)\n"
            "opt = lt.pretrained('small_fc_lopt_general', m.parameters(), num_steps=10)\n"
            "def c():\n"
            "    opt.zero_grad(); l = m(torch.ones(4, 3)).square().mean(); l.backward(); return l\n"
            "for _ in range(3): opt.step(c)\n"
            "for n in lt.available(): lt.pretrained(n, m.parameters(), 5, guard=False).step()\n"
            "top = {k.split('.')[0] for k in sys.modules}\n"
            "bad = top & {'jax', 'jaxlib', 'flax', 'optax'}\n"
            "assert not bad, bad\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@pytest.mark.parametrize("kind", ["small_fc_lopt_general", "small_fc_lopt_fmnist8"])
def test_small_model_trains(kind):
    torch.manual_seed(0)
    model = Net()
    x, y = _data()
    opt = lt.pretrained(kind, model.parameters(), num_steps=300)
    closure = _closure(model, opt, x, y)
    losses = [opt.step(closure).detach().item() for _ in range(300)]
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10]), (losses[:3], losses[-3:])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("guard", [False, True])
def test_state_dict_round_trip_continues_identically(kind, guard):
    torch.manual_seed(1)
    x, y = _data(1)
    a = Net()
    opt_a = _make(kind, a.parameters(), guard=guard)
    closure_a = _closure(a, opt_a, x, y)
    for _ in range(5):
        opt_a.step(closure_a)
    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": opt_a.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)

    b = Net()
    b.load_state_dict(saved["model"])
    opt_b = _make(kind, b.parameters(), guard=guard)
    opt_b.load_state_dict(saved["opt"])
    closure_b = _closure(b, opt_b, x, y)
    for _ in range(5):
        la, lb = opt_a.step(closure_a), opt_b.step(closure_b)
        assert float(la.detach()) == float(lb.detach())
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    if guard:
        assert opt_a.guard_state == opt_b.guard_state


def test_state_dict_holds_the_guard_counters():
    model = torch.nn.Linear(3, 1)
    opt = lt.pretrained("small_fc_lopt_general", model.parameters(), 10)
    x = torch.randn(8, 3)
    opt.zero_grad()
    loss = model(x).square().mean()
    loss.backward()
    opt.step(loss=loss)
    sd = copy.deepcopy(opt.state_dict())
    assert sd["state"]["guard"]["has_initial_loss"] is True
    assert set(sd["state"][0]) >= {"step", "momentum", "rms", "v_row", "v_col", "v_full",
                                   "guard_param", "guard_state"}


def test_guard_rolls_back_a_blow_up_and_sanitises():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    opt = lt.pretrained("small_fc_lopt_general", [p], 10)
    p.grad = torch.tensor([0.1, 0.2, 0.3])
    opt.step(loss=1.0)
    after_first = p.detach().clone()
    p.grad = torch.tensor([0.1, float("nan"), 0.3])
    opt.step(loss=float("nan"))  # a blow-up: back to the parameters of the last good loss
    assert torch.equal(p.detach(), torch.tensor([1.0, -2.0, 3.0]))
    gs = opt.guard_state
    assert gs["num_rollbacks"] == 1 and gs["num_sanitized"] == 1 and gs["scale"] == 0.5
    assert not torch.equal(after_first, p.detach())


# ----------------------------------------------------------------------------- errors


def test_unknown_name():
    with pytest.raises(ValueError, match="unknown pretrained optimizer 'nope'.*small_fc_lopt"):
        lt.pretrained("nope", [torch.nn.Parameter(torch.zeros(2))], 10)


def test_unported_architecture():
    with pytest.raises(ValueError, match="not ported to PyTorch"):
        lt.from_theta("velo", [torch.nn.Parameter(torch.zeros(2))], {}, 10)


@pytest.mark.parametrize("num_steps", [0, -3, 2.5, True, None, "100"])
def test_bad_num_steps(num_steps):
    with pytest.raises(ValueError, match="num_steps"):
        lt.pretrained("small_fc_lopt_general", [torch.nn.Parameter(torch.zeros(2))], num_steps)
    with pytest.raises(ValueError, match="num_steps"):
        lt.TorchSmallFcLOpt([torch.nn.Parameter(torch.zeros(2))], _theta("small_fc_lopt"),
                            num_steps)


def test_guarded_needs_closure():
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.ones(3)
    opt = lt.pretrained("small_fc_lopt_general", [p], 10)
    with pytest.raises(ValueError, match="needs the loss.*closure"):
        opt.step()
    with pytest.raises(ValueError, match="not both"):
        opt.step(lambda: torch.tensor(1.0), loss=1.0)


@pytest.mark.parametrize("kind", ["small_fc_lopt", "fc_lopt", "nn_adam"])
def test_bare_closure_optional(kind):
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    opt = _make(kind, [p])
    assert opt.step() is None
    assert not torch.equal(p.detach(), torch.ones(3))

    def closure():
        opt.zero_grad()
        loss = p.square().sum()
        loss.backward()
        return loss

    assert opt.step(closure).detach().item() > 0


def test_wrong_theta_shape():
    theta = _theta("small_fc_lopt")
    theta["nn"]["w0"] = np.zeros((38, 4), np.float32)
    with pytest.raises(ValueError, match=r"theta\['nn'\]\['w0'\] has shape \(38, 4\)"):
        lt.TorchSmallFcLOpt([torch.nn.Parameter(torch.zeros(2))], theta, 10)


def test_bad_guard_settings():
    with pytest.raises(ValueError, match="unknown guard settings"):
        lt.pretrained("small_fc_lopt_general", [torch.nn.Parameter(torch.zeros(2))], 10,
                      guard={"blowup": 2.0})
    with pytest.raises(ValueError, match="shrink"):
        lt.pretrained("small_fc_lopt_general", [torch.nn.Parameter(torch.zeros(2))], 10,
                      guard={"shrink": 1.5})
    for bad in (0, 1.5, True, "5"):  # as the JAX guard: an integer >= 1, nothing else
        with pytest.raises(ValueError, match="patience must be an integer >= 1"):
            lt.pretrained("small_fc_lopt_general", [torch.nn.Parameter(torch.zeros(2))], 10,
                          guard={"patience": bad})


def test_params_without_grad_are_left_alone():
    a, b = torch.nn.Parameter(torch.ones(2, 3)), torch.nn.Parameter(torch.ones(4))
    opt = lt.pretrained("small_fc_lopt_general", [a, b], 10)
    a.grad = torch.ones(2, 3)
    opt.step(loss=1.0)
    assert torch.equal(b.detach(), torch.ones(4)) and not torch.equal(a.detach(), torch.ones(2, 3))


def test_available_matches_the_shipped_files():
    assert NAMES == ["small_fc_lopt_fmnist8", "small_fc_lopt_general"]
    meta, theta = read_pretrained("small_fc_lopt_general")
    assert meta["architecture"] == "small_fc_lopt" and meta["guard"]
    assert theta["nn"]["w0"].shape == (39, 4) and theta["nn"]["w0"].dtype == np.float32
