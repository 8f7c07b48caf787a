"""Cross-cutting reliability checks, one table for every steadystep optimizer (and ALRC).

Empty groups, frozen and 0-d params; ``p.grad`` untouched; no host sync in a steady-state step;
no memory growth, and the state per parameter the docs give; the same seed with deterministic
algorithms gives bitwise equal runs. The CUDA test runs on a GPU
machine only; on CPU a dispatch mode stands in for it: it counts ``aten._local_scalar_dense``,
the op behind ``.item()``, ``bool(t)``, ``float(t)`` and a 0-d tensor passed where an op takes a
Python number, which are the host reads that would sync a CUDA step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import steadystep as ss
from steadystep.optim.cprop import wrapper as cprop_wrapper

# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    """``make(params_or_groups, foreach)`` builds the optimizer (``foreach=None``: its default).

    ``extra`` is the number of full-size fp32 state tensors per parameter that the docs give on
    top of ``bare``, the optimizer it extends (docs/cprop.md, docs/alera.md); ``host_sync``
    marks the one documented host read per step (the guard around a third-party optimizer).
    """

    make: Callable[[Any, bool | None], Any]
    extra: int
    bare: Callable[[Any], torch.optim.Optimizer] | None = None
    host_sync: bool = False


def _sgd(ps: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(ps, lr=0.05, momentum=0.9)


def _adam(ps: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(ps, lr=1e-2)


def _adamw(ps: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(ps, lr=1e-2)


def _alera(granularity: str) -> Case:
    # r (and for "param" the per-element multipliers) on top of plain SGD, which keeps nothing
    return Case(
        lambda ps, fe: ss.ALeRA(ps, lr=0.01, granularity=granularity, foreach=fe),
        extra=2 if granularity == "param" else 1,
        bare=lambda ps: torch.optim.SGD(ps, lr=0.01),
    )


CASES: dict[str, Case] = {
    # CProp: two statistics per parameter (m, v) beside the base's own state; a fused AdamW base
    # keeps its step count on the device (torch's default keeps it on the host and reads it).
    "CProp(SGD)": Case(lambda ps, fe: ss.CProp(_sgd(ps)), extra=2, bare=_sgd),
    "CProp(AdamW)": Case(
        lambda ps, fe: ss.CProp(torch.optim.AdamW(ps, lr=1e-2, fused=True)), extra=2, bare=_adamw
    ),
    "CPropSGD": Case(
        lambda ps, fe: ss.CPropSGD(ps, lr=0.05, momentum=0.9, foreach=fe), extra=2, bare=_sgd
    ),
    # shared v (betas[1] == cprop_beta, Adam sees the raw gradient): Adam's state + 1 tensor
    "CPropAdam": Case(lambda ps, fe: ss.CPropAdam(ps, lr=1e-2, foreach=fe), extra=1, bare=_adam),
    "CPropAdamW": Case(lambda ps, fe: ss.CPropAdamW(ps, lr=1e-2, foreach=fe), extra=1, bare=_adamw),
    "CPropAdamW(own v)": Case(
        lambda ps, fe: ss.CPropAdamW(ps, lr=1e-2, cprop_beta=0.99, foreach=fe),
        extra=2,
        bare=_adamw,
    ),
    "ALeRA(global)": _alera("global"),
    "ALeRA(group)": _alera("group"),
    "ALeRA(tensor)": _alera("tensor"),
    "ALeRA(param)": _alera("param"),
    # Ag-Adam: ALeRA's r on top of Adam's two moments
    "AgAdam": Case(lambda ps, fe: ss.AgAdam(ps, lr=1e-2, foreach=fe), extra=1, bare=_adam),
    # the guard keeps one copy of the parameters (the rollback snapshot)
    "SALeRA": Case(
        lambda ps, fe: ss.SALeRA(ps, lr=0.01, foreach=fe),
        extra=2,
        bare=lambda ps: torch.optim.SGD(ps, lr=0.01),
    ),
    "SPALeRA": Case(
        lambda ps, fe: ss.SPALeRA(ps, lr=0.01, foreach=fe),
        extra=3,
        bare=lambda ps: torch.optim.SGD(ps, lr=0.01),
    ),
    # the full rollback's snapshot (Note [full rollback]): the parameters and Adam's moments
    "CatastropheGuard(AdamW)": Case(
        lambda ps, fe: ss.CatastropheGuard(torch.optim.AdamW(ps, lr=1e-2, foreach=fe)),
        extra=3,
        bare=_adamw,
        host_sync=True,
    ),
    # torch's fused AdamW is masked through its found_inf: sync-free too
    "CatastropheGuard(AdamW fused)": Case(
        lambda ps, fe: ss.CatastropheGuard(torch.optim.AdamW(ps, lr=1e-2, fused=True)),
        extra=3,
        bare=_adamw,
    ),
    # a MaskableOptimizer inside: the sync-free path (CProp's shared v, and the snapshot of
    # the parameters, Adam's moments and CProp's v)
    "CatastropheGuard(CPropAdamW)": Case(
        lambda ps, fe: ss.CatastropheGuard(ss.CPropAdamW(ps, lr=1e-2, foreach=fe)),
        extra=5,
        bare=_adamw,
    ),
}
NAMES = list(CASES)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _mlp(device: str = "cpu") -> torch.nn.Module:
    torch.manual_seed(0)
    # every parameter has more than one element, so full-size state is told from 0-d counters
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    return model.to(device)


def _batch(i: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + i)
    x = torch.randn(16, 4, generator=g)
    y = torch.stack([x[:, 0] * x[:, 1], x[:, 2] - x[:, 3]], 1)
    return x.to(device), y.to(device)


def _batches(model: torch.nn.Module, steps: range) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every batch of ``steps`` on the model's device (a host-to-device copy is a sync: the
    CUDA tests make them before the steps they check)."""
    device = next(model.parameters()).device.type
    return [_batch(i, device) for i in steps]


def _train(
    model: torch.nn.Module,
    opt: Any,
    steps: range,
    batches: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> None:
    torch_optimizer = type(opt).__module__.startswith("torch.optim")
    for x, y in _batches(model, steps) if batches is None else batches:
        loss = (model(x) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        if torch_optimizer:
            opt.step()
        else:
            opt.step(loss=loss.detach())  # every steadystep optimizer takes it


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a nested state_dict."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, list | tuple):
        for value in obj:
            yield from _tensors(value)


def _nbytes(tensors: Iterator[torch.Tensor] | list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _reachable_tensors(root: Any) -> list[torch.Tensor]:
    """Distinct tensors reachable from ``root`` through the attributes of steadystep and
    torch.optim objects (and modules), dicts, lists, tuples and sets; tensors are leaves."""
    seen: set[int] = set()
    found: dict[int, torch.Tensor] = {}
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            found[id(obj)] = obj
        elif isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, list | tuple | set | frozenset):
            stack.extend(obj)
        elif hasattr(obj, "__dict__") and (
            isinstance(obj, torch.optim.Optimizer | torch.nn.Module)
            or type(obj).__module__.startswith("steadystep")
        ):
            stack.extend(vars(obj).values())
    return list(found.values())


def _footprint(obj: Any) -> tuple[int, int, int, int]:
    """(state_dict tensor bytes, their count, reachable tensor bytes, their count)."""
    in_state = list(_tensors(obj.state_dict()))
    reachable = _reachable_tensors(obj)
    return _nbytes(in_state), len(in_state), _nbytes(reachable), len(reachable)


def _assert_same(a: Any, b: Any, path: str = "") -> None:
    """Bitwise equality of nested state (tensors by dtype and bits, NaN included)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b) or torch.equal(_bits(a), _bits(b)), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _assert_same(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def _states(opt: Any) -> list[dict[Any, Any]]:
    """Per-parameter state dicts of an optimizer (the wrapped one's too, CProp's own)."""
    out = [opt.state]
    if hasattr(opt, "cprop_state"):
        out.append(opt.cprop_state)
    return out


class _HostReads(TorchDispatchMode):
    """Counts ``aten._local_scalar_dense``: ``.item()``, ``bool(t)``, a 0-d tensor read as a
    Python number by an op (each is a host sync on CUDA)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def deterministic() -> Iterator[None]:
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


@contextlib.contextmanager
def _sync_debug(mode: str) -> Iterator[None]:
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(before)


# --------------------------------------------------------------------------------------------
# 21. Memory: no growth, and the state per parameter the docs give
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_memory_at_step_100_equals_memory_at_step_2(name):
    model = _mlp()
    opt = CASES[name].make(model.parameters(), None)
    _train(model, opt, range(2))
    at_2 = _footprint(opt)
    _train(model, opt, range(2, 100))
    assert _footprint(opt) == at_2
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_alrc_memory_at_step_100_equals_memory_at_step_2():
    alrc = ss.ALRC(beta1=0.9, beta2=0.9)
    losses = torch.rand(100, 16, generator=torch.Generator().manual_seed(0))
    for i in range(2):
        alrc(losses[i])
    at_2 = _footprint(alrc)
    for i in range(2, 100):
        alrc(losses[i])
    assert _footprint(alrc) == at_2


@pytest.mark.parametrize("name", NAMES)
def test_extra_state_per_parameter_is_what_the_docs_say(name):
    case = CASES[name]
    shapes = {tuple(p.shape) for p in _mlp().parameters()}
    param_bytes = _nbytes(list(_mlp().parameters()))

    def full_size_bytes(make: Callable[[Any], Any]) -> int:
        model = _mlp()
        opt = make(model.parameters())
        _train(model, opt, range(2))
        state = [t for t in _tensors(opt.state_dict()) if tuple(t.shape) in shapes]
        assert all(t.dtype == torch.float32 for t in state)
        return _nbytes(state)

    bare = full_size_bytes(case.bare) if case.bare is not None else 0
    total = full_size_bytes(lambda ps: case.make(ps, None))
    assert total - bare == case.extra * param_bytes


# --------------------------------------------------------------------------------------------
# 22. Determinism
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_two_runs_with_the_same_seed_are_bitwise_equal(name, deterministic):
    def run() -> tuple[list[torch.Tensor], dict[str, Any]]:
        model = _mlp()
        opt = CASES[name].make(model.parameters(), None)
        _train(model, opt, range(20))
        return [p.detach().clone() for p in model.parameters()], opt.state_dict()

    params_a, state_a = run()
    params_b, state_b = run()
    _assert_same(params_a, params_b)
    _assert_same(state_a, state_b)


def test_alrc_two_runs_with_the_same_seed_are_bitwise_equal(deterministic):
    def run() -> tuple[torch.Tensor, dict[str, Any]]:
        alrc = ss.ALRC(beta1=0.9, beta2=0.9)
        losses = torch.rand(20, 16, generator=torch.Generator().manual_seed(0)) * 3
        out = torch.stack([alrc(losses[i]) for i in range(20)])
        return out, alrc.state_dict()

    out_a, state_a = run()
    out_b, state_b = run()
    _assert_same(out_a, out_b)
    _assert_same(dict(state_a), dict(state_b))


# --------------------------------------------------------------------------------------------
# 14. Empty groups, frozen and 0-d parameters
# --------------------------------------------------------------------------------------------


def _odd_params() -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(3, 2))
    bias = torch.nn.Parameter(torch.zeros(3))
    scalar = torch.nn.Parameter(torch.tensor(0.5))  # 0-d
    frozen = torch.nn.Parameter(torch.randn(5))  # never in the loss: its grad stays None
    return [weight, bias, scalar, frozen]


def _odd_groups(params: list[torch.nn.Parameter]) -> list[dict[str, Any]]:
    weight, bias, scalar, frozen = params
    return [{"params": []}, {"params": [weight, bias]}, {"params": [scalar, frozen]}]


def _odd_train(params: list[torch.nn.Parameter], opt: Any, steps: range) -> None:
    weight, bias, scalar, _ = params
    for i in steps:
        x, y = _batch(i)
        loss = ((x[:, :2] @ weight.T + bias) * scalar - y[:, :1]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step(loss=loss.detach())


@pytest.mark.parametrize("name", NAMES)
def test_empty_groups_frozen_and_0d_params_work_and_round_trip(name):
    make = CASES[name].make
    params = _odd_params()
    start = [p.detach().clone() for p in params]
    opt = make(_odd_groups(params), None)
    _odd_train(params, opt, range(3))
    weight, _, scalar, frozen = params
    assert frozen.grad is None and torch.equal(frozen, start[3])
    assert all(not states.get(frozen) for states in _states(opt)), "state for a grad-None param"
    assert not torch.equal(scalar, start[2]) and not torch.equal(weight, start[0])

    # state_dict -> bytes -> weights_only load into fresh objects, then both continue alike
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    fresh = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = make(_odd_groups(fresh), None)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    _odd_train(params, opt, range(3, 5))
    _odd_train(fresh, resumed, range(3, 5))
    _assert_same([p.detach() for p in params], [p.detach() for p in fresh])
    _assert_same(opt.state_dict(), resumed.state_dict())


@pytest.mark.xfail(
    strict=True,
    reason="the guard snapshots every parameter, frozen ones too (one copy each, never needed)",
)
@pytest.mark.parametrize("name", ["SALeRA", "CatastropheGuard(AdamW)"])
def test_guard_keeps_no_snapshot_of_grad_none_params(name):
    params = _odd_params()
    opt = CASES[name].make(_odd_groups(params), None)
    _odd_train(params, opt, range(2))
    frozen = params[3]
    snapshots = opt._nested_state_dict(opt.state_dict())["guard"]["snapshots"]
    assert not any(s.shape == frozen.shape for s in snapshots)


# --------------------------------------------------------------------------------------------
# 17. p.grad is never written
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_grad_is_bitwise_unchanged_by_step_including_a_nonfinite_one(name):
    model = _mlp()
    opt = CASES[name].make(model.parameters(), None)
    for i in range(4):
        x, y = _batch(i)
        loss = (model(x) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        if i == 2:
            model[0].weight.grad[0, 0] = float("nan")
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step(loss=loss.detach())
        _assert_same([p.grad for p in model.parameters()], grads)


# --------------------------------------------------------------------------------------------
# 20. No host sync in a steady-state step
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["fused", "loop", "foreach"])
@pytest.mark.parametrize("name", NAMES)
def test_steady_state_step_reads_nothing_on_the_host(name, path, monkeypatch):
    """The CPU stand-in for the CUDA test below, for each path: the fused kernels (the
    default), the per-tensor loop and foreach (``STEADYSTEP_FUSED=0`` turns the kernels off).
    The CProp wrapper picks its eager path itself: forced here."""
    case = CASES[name]
    foreach = path == "foreach"
    if path != "fused":
        monkeypatch.setenv("STEADYSTEP_FUSED", "0")
    monkeypatch.setattr(cprop_wrapper, "_default_foreach", lambda params: foreach)
    model = _mlp()
    opt = case.make(model.parameters(), True if foreach else None)
    _train(model, opt, range(3))
    reads = _HostReads()
    with reads:
        _train(model, opt, range(3, 8))
    if case.host_sync:
        assert reads.count >= 5  # documented: the alarm is read on the host every step
    else:
        assert reads.count == 0


def test_alrc_forward_and_backward_read_nothing_on_the_host():
    model = _mlp()
    alrc = ss.ALRC(beta1=0.9, beta2=0.9)
    for i in range(8):
        reads = _HostReads()
        x, y = _batch(i)
        with reads:
            alrc((model(x) - y).pow(2).mean(1)).mean().backward()
        assert i < 3 or reads.count == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", NAMES)
def test_cuda_steady_state_step_does_not_sync(name):
    """Warm-up steps create the state; five steady-state steps (forward, backward, step) then
    run under ``set_sync_debug_mode("error")``. The guard around torch's AdamW reads the alarm
    on the host every step (docs/alera.md): there the test asserts that it does."""
    case = CASES[name]
    model = _mlp("cuda")
    opt = case.make(model.parameters(), None)
    _train(model, opt, range(3))
    batches = _batches(model, range(3, 8))
    torch.cuda.synchronize()
    if case.host_sync:
        with _sync_debug("error"), pytest.raises(RuntimeError, match="synchroniz"):
            _train(model, opt, range(3, 8), batches)
    else:
        with _sync_debug("error"):
            _train(model, opt, range(3, 8), batches)
    torch.cuda.synchronize()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_alrc_does_not_sync():
    model = _mlp("cuda")
    alrc = ss.ALRC(beta1=0.9, beta2=0.9).cuda()
    batches = [_batch(i, "cuda") for i in range(8)]
    for x, y in batches[:3]:
        alrc((model(x) - y).pow(2).mean(1)).mean().backward()
    torch.cuda.synchronize()
    with _sync_debug("error"):
        for x, y in batches[3:]:
            alrc((model(x) - y).pow(2).mean(1)).mean().backward()
    torch.cuda.synchronize()
