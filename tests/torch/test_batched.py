"""The batched step (all parameter tensors together, ``opt.batched = True``, the default)
computes the same function as the per-tensor reference path (``opt.batched = False``)."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")

from test_torch import _theta  # noqa: E402

import learnopt.torch as lt  # noqa: E402

# every rank, ties between equal dims, and one tensor large enough for several MLP chunks
SHAPES = [(), (5,), (3, 4), (3, 3), (7, 2), (4, 3, 3, 3), (1,), (90, 70)]
ARCHS = ["small_fc_lopt", "fc_lopt", "nn_adam"]


def _run(kind, batched, guard, steps=25, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]
    groups = [{"params": params[:3]}, {"params": params[3:]}]
    # patience 1: the single high loss of step 9 is rolled back at once
    opt = lt.from_theta(kind, groups, _theta(kind), 100, guard={"patience": 1} if guard else False)
    opt.batched = batched
    traj = []
    for i in range(steps):
        for j, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=g) * (1.0 + j)
        if i in (5, 6):  # a parameter without a gradient is skipped (its step lags behind)
            params[1].grad = None
        if i == 12:  # a non-finite gradient element: the guard sanitises it
            params[0].grad = torch.tensor(float("inf"))
        if i == 15:  # finite, but its square overflows
            params[2].grad[1, 1] = 1e30
        loss = 1.0 if i != 9 else 50.0  # a blow-up at step 9 (guarded runs)
        opt.step(loss=loss) if guard else opt.step()
        traj.append([p.detach().clone() for p in params])
    return traj, opt


def _max_rel(a, b):
    worst = 0.0
    for xa, xb in zip(a, b, strict=True):
        for pa, pb in zip(xa, xb, strict=True):
            scale = float(pb.abs().max().clamp_min(1e-12))
            worst = max(worst, float((pa - pb).abs().max()) / scale)
    return worst


@pytest.mark.parametrize("guard", [False, True])
@pytest.mark.parametrize("kind", ARCHS)
def test_batched_equals_reference(kind, guard):
    fast, opt = _run(kind, True, guard)
    ref, _ = _run(kind, False, guard)
    assert _max_rel(fast, ref) <= 1e-6
    if guard:
        assert opt.guard_state["num_rollbacks"] >= 1
        assert opt.guard_state["num_sanitized"] == 1


@pytest.mark.parametrize("guard", [False, True])
@pytest.mark.parametrize("kind", ["small_fc_lopt", "fc_lopt"])
def test_native_kernel_and_torch_batched_path(kind, guard, monkeypatch):
    """On CPU the batched small_fc_lopt and fc_lopt steps run every tensor through their
    native kernel; with it off, through torch ops. Both equal the reference path."""
    from learnopt.learned import native

    if not native.available():
        pytest.skip("numba is not installed")
    calls = []
    real = native.run  # every kernel call, planned (bare step) or not (guarded)
    monkeypatch.setattr(native, "run", lambda *a, **k: calls.append(1) or real(*a, **k))
    ref, _ = _run(kind, False, guard)
    assert not calls
    with_kernel, _ = _run(kind, True, guard)
    # every step, every tensor with a gradient (params[1] has none at steps 5 and 6)
    assert len(calls) == 25 * len(SHAPES) - 2
    monkeypatch.setattr(native, "_STATE", {"enabled": False})
    calls.clear()
    without, _ = _run(kind, True, guard)
    assert not calls
    assert _max_rel(with_kernel, ref) <= 1e-6 and _max_rel(without, ref) <= 1e-6


@pytest.mark.parametrize("kind", ARCHS)
def test_batched_state_dict_switch_paths(kind):
    """A state written by one path continues identically on the other, through state_dict."""
    a, opt_a = _run(kind, True, False, steps=8)
    params = [torch.nn.Parameter(p.clone()) for p in a[-1]]
    opt_b = lt.from_theta(kind, [{"params": params[:3]}, {"params": params[3:]}],
                          _theta(kind), 100)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    opt_b.batched = False
    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(p.shape, generator=g) for p in params]
    params_a = [p for grp in opt_a.param_groups for p in grp["params"]]
    for pa, pb, gr in zip(params_a, params, grads, strict=True):
        pa.grad, pb.grad = gr.clone(), gr.clone()
    opt_a.step()
    opt_b.step()
    assert _max_rel([[p.detach() for p in params_a]], [[p.detach() for p in params]]) <= 1e-6


@pytest.mark.parametrize("kind", ARCHS)
def test_empty_parameter_is_skipped(kind):
    w = torch.nn.Parameter(torch.randn(3, 4))
    e = torch.nn.Parameter(torch.zeros(0))
    opt = lt.from_theta(kind, [w, e], _theta(kind), 100)
    w.grad, e.grad = torch.randn(3, 4), torch.zeros(0)
    before = w.detach().clone()
    opt.step()
    assert not torch.equal(before, w.detach())
    assert torch.isfinite(w).all()


@pytest.mark.parametrize("guard", [False, True])
@pytest.mark.parametrize("kind", ARCHS)
def test_checkpoint_holds_the_state_only(kind, guard):
    """The batched path's state entries are views of flat buffers; a saved state_dict must
    not carry the scratch buffers along (torch.save writes a view's whole storage)."""
    import io

    params = [torch.nn.Parameter(torch.randn(300, 200)), torch.nn.Parameter(torch.randn(200))]
    opt = lt.from_theta(kind, params, _theta(kind), 100, guard=guard)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape)
        opt.step(loss=1.0) if guard else opt.step()
    data = io.BytesIO()
    torch.save(opt.state_dict(), data)
    assert len(data.getvalue()) < 1.25 * opt.state_bytes() + 100_000


def test_fc_lopt_kernel_keeps_float64_state_out_of_place():
    """A float64 parameter and momentum (as load_state_dict casts them) take the kernel
    through float32 copies: the new momentum is returned, not lost in a copy."""
    from learnopt.learned import native

    if not native.available():
        pytest.skip("numba is not installed")
    runs = []
    for batched in (True, False):
        g = torch.Generator().manual_seed(5)
        p = torch.nn.Parameter(torch.randn(6, 5, generator=g, dtype=torch.float64))
        opt = lt.from_theta("fc_lopt", [p], _theta("fc_lopt"), 100)
        opt.batched = batched
        for i in range(4):
            if i == 2:  # load_state_dict casts the state to the parameter's dtype
                opt.load_state_dict(copy.deepcopy(opt.state_dict()))
                assert opt.state[p]["momentum"].dtype == torch.float64
            p.grad = torch.randn(6, 5, generator=g, dtype=torch.float64)
            opt.step()
        runs.append((p.detach().clone(), opt.state[p]["momentum"].to(torch.float64)))
    (p_fast, m_fast), (p_ref, m_ref) = runs
    assert float(m_ref.abs().max()) > 0
    assert float((m_fast - m_ref).abs().max()) <= 1e-6 * float(m_ref.abs().max())
    assert float((p_fast - p_ref).abs().max()) <= 1e-5 * float(p_ref.abs().max())
