"""The fused multi-tensor kernels (steadystep._kernels): one call per step whatever the number
of tensors, the gradient limit, the fallback without a compiler, and the Triton kernels (run
on the CPU under ``TRITON_INTERPRET=1``) against the reference paths."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import steadystep as ss
from steadystep import _kernels
from steadystep._kernels import _cpu, layout

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# Host work per step: the same number of kernel calls for 16 and for 300 tensors
# --------------------------------------------------------------------------------------------


class _Calls(TorchDispatchMode):
    """Counts the ATen ops that run a kernel (every op but views, which only make metadata);
    the names of the ops are kept for the failure message."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


class _CountingLibrary:
    """A compiled library whose ``ss_*`` functions count their calls."""

    calls = 0

    def __init__(self, lib) -> None:
        self._lib = lib

    def __getattr__(self, name):
        fn = getattr(self._lib, name)
        if not name.startswith("ss_"):
            return fn

        def counted(*args):
            _CountingLibrary.calls += 1
            return fn(*args)

        return counted


def _layers(n_tensors: int) -> list[dict]:
    """``n_tensors`` parameters in layers of a weight and a bias, with gradients."""
    gen = torch.Generator().manual_seed(0)
    groups = []
    for _ in range(n_tensors // 2):
        w = torch.nn.Parameter(torch.randn(8, 8, generator=gen))
        b = torch.nn.Parameter(torch.randn(8, generator=gen))
        for p in (w, b):
            p.grad = torch.randn(p.shape, generator=gen)
        groups.append({"params": [w, b]})
    return groups


MAKERS = {
    "CPropAdamW": lambda groups: ss.CPropAdamW([p for g in groups for p in g["params"]]),
    "CPropSGD": lambda groups: ss.CPropSGD(
        [p for g in groups for p in g["params"]], lr=0.1, momentum=0.9
    ),
    "CProp(AdamW fused)": lambda groups: ss.CProp(
        torch.optim.AdamW([p for g in groups for p in g["params"]], fused=True)
    ),
    "ALeRA(group)": lambda groups: ss.ALeRA(groups, lr=0.1),
    "ALeRA(param)": lambda groups: ss.ALeRA(groups, lr=0.1, granularity="param"),
    "AgAdam(group)": lambda groups: ss.AgAdam(groups),
    "SALeRA": lambda groups: ss.SALeRA(groups, lr=0.1),
    "guard(AdamW fused)": lambda groups: ss.CatastropheGuard(
        torch.optim.AdamW([p for g in groups for p in g["params"]], fused=True)
    ),
}


def _calls_per_step(name: str, n_tensors: int, monkeypatch) -> tuple[int, int]:
    opt = MAKERS[name](_layers(n_tensors))
    loss = torch.ones(())
    for _ in range(2):  # state, compiled libraries and tables are made here
        opt.step(loss=loss) if "guard" in name or "SALeRA" in name else opt.step()
    real = _cpu.library
    monkeypatch.setattr(_cpu, "library", lambda config: _CountingLibrary(real(config)))
    _CountingLibrary.calls = 0
    with _Calls() as mode:
        opt.step(loss=loss) if "guard" in name or "SALeRA" in name else opt.step()
    monkeypatch.setattr(_cpu, "library", real)
    return len(mode.ops), _CountingLibrary.calls, sorted(set(mode.ops))


@pytest.mark.parametrize("name", list(MAKERS))
def test_kernel_calls_per_step_do_not_grow_with_the_number_of_tensors(name, monkeypatch):
    """Every optimizer's default path makes the same number of kernel calls (ATen ops and
    calls into the compiled library) for 16 tensors as for 300."""
    few = _calls_per_step(name, 16, monkeypatch)
    many = _calls_per_step(name, 300, monkeypatch)
    assert few[1] >= 1, "the fused kernels did not run"
    assert few[:2] == many[:2], (
        f"{name}: (ATen ops, library calls) {few[:2]} for 16 tensors, {many[:2]} for 300; "
        f"ops {many[2]}"
    )


# --------------------------------------------------------------------------------------------
# Huge finite gradients (Note [huge gradients])
# --------------------------------------------------------------------------------------------

HUGE_MAKERS = {
    "CPropAdamW": lambda ps, fused: ss.CPropAdamW(ps, fused=fused),
    "CPropAdam-amsgrad": lambda ps, fused: ss.CPropAdam(ps, amsgrad=True, fused=fused),
    "CPropSGD": lambda ps, fused: ss.CPropSGD(ps, lr=0.1, momentum=0.9, fused=fused),
    "CProp(Adam)": lambda ps, fused: ss.CProp(torch.optim.Adam(ps), fused=fused),
    "ALeRA": lambda ps, fused: ss.ALeRA(ps, lr=0.1, fused=fused),
    "AgAdam": lambda ps, fused: ss.AgAdam(ps, fused=fused),
}


@pytest.mark.parametrize("value", [1e19, 1e25, 1e30, 3.4e38])
@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
@pytest.mark.parametrize("name", list(HUGE_MAKERS))
def test_huge_finite_gradients_skip_the_step_on_every_path(name, fused, value):
    """A finite gradient element above 2**63 (float32) skips the step: params and state stay
    bitwise as they were, never NaN or inf; the next clean step goes on. (The CProp wrapper
    protects its own statistics and the parameters; the base optimizer's own state sees the
    gradient, as documented: guarding it is the guard's job.)"""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(70000))]
    opt = HUGE_MAKERS[name](params, fused)
    for p in params:
        p.grad = torch.randn(p.shape)
    opt.step()
    before = [p.detach().clone() for p in params]

    def tensors():
        states = getattr(opt, "cprop_state", {})
        out = {}
        for i, p in enumerate(params):
            base = {} if isinstance(opt, ss.CProp) else opt.state.get(p, {})
            for where, st in (("state", base), ("cprop", states.get(p, {}))):
                out.update({(i, where, k): v.clone() for k, v in st.items() if torch.is_tensor(v)})
        for gi, group in enumerate(opt.param_groups):
            out.update({(gi, k): v.clone() for k, v in group.items() if torch.is_tensor(v)})
        return out

    state = tensors()
    params[1].grad[123] = value
    opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    after = tensors()
    assert after.keys() == state.keys()
    for key, v in after.items():
        if key[-1] == "skipped_steps":
            assert int(v) == int(state[key]) + 1  # counted as a skipped step
            continue
        assert torch.equal(v, state[key]) and torch.isfinite(v).all(), key
    params[1].grad[123] = 1.0
    opt.step()
    assert all(torch.isfinite(p).all() for p in params)
    assert not all(torch.equal(p, b) for p, b in zip(params, before, strict=True))


def test_the_limit_is_the_square_root_bound_of_the_statistics():
    assert _kernels.gradient_limit(torch.float32) == 2.0**63
    assert _kernels.gradient_limit(torch.float64) == 2.0**511
    for dtype in (torch.float32, torch.float64):
        limit = torch.tensor(_kernels.gradient_limit(dtype), dtype=dtype)
        assert torch.isfinite(limit * limit * 3)  # squares and their EMA sums stay finite
    assert _kernels.stats_dtype(torch.bfloat16) == torch.float32


# --------------------------------------------------------------------------------------------
# Building the library: cache, opt-out, no compiler
# --------------------------------------------------------------------------------------------


def _fresh_process(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(ROOT / "src"), **env}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=full,
        capture_output=True,
        text=True,
        timeout=300,
    )


STEP = """
    import warnings, torch, steadystep as ss
    from steadystep._kernels import _cpu, layout
    p = torch.nn.Parameter(torch.ones(10)); p.grad = torch.full((10,), 0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ss.CPropAdamW([p], lr=0.1).step()
    print("warnings", sum("could not build" in str(w.message) for w in caught))
    print("built", sum(lib is not None for lib in _cpu._LOADED.values()))
    print("param", round(float(p.detach()[0]), 6))
"""


def test_without_a_compiler_the_eager_path_runs_with_one_warning(tmp_path):
    out = _fresh_process(
        STEP, {"CC": str(tmp_path / "no-such-cc"), "STEADYSTEP_CACHE_DIR": str(tmp_path)}
    )
    assert out.returncode == 0, out.stderr
    assert "warnings 1" in out.stdout and "built 0" in out.stdout
    fused = _fresh_process(STEP, {"STEADYSTEP_CACHE_DIR": str(tmp_path / "cache")})
    assert fused.returncode == 0, fused.stderr
    assert "warnings 0" in fused.stdout and "built 0" not in fused.stdout
    # the same first step either way (s = 1 at t = 1), to float32 rounding
    first = [float(run.stdout.split("param")[-1]) for run in (out, fused)]
    assert math.isclose(first[0], first[1], rel_tol=1e-5)
    assert list((tmp_path / "cache").glob("kernels-*.so")), "the library is cached on disk"


def test_steadystep_fused_0_turns_the_kernels_off(tmp_path):
    out = _fresh_process(STEP, {"STEADYSTEP_FUSED": "0", "STEADYSTEP_CACHE_DIR": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert "built 0" in out.stdout and "warnings 0" in out.stdout


def test_fused_true_without_kernels_is_an_error(monkeypatch):
    monkeypatch.setenv("STEADYSTEP_FUSED", "0")
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    for opt in (
        ss.CPropAdamW([p], fused=True),
        ss.CProp(torch.optim.SGD([p], lr=0.1), fused=True),
        ss.ALeRA([p], lr=0.1, fused=True),
    ):
        with pytest.raises(RuntimeError, match="fused=True"):
            opt.step()


def test_sixteen_bit_floats_without_a_kernel_take_the_eager_path():
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
    p.grad = torch.full((4,), 0.5, dtype=torch.float16)
    opt = ss.CPropAdamW([p], lr=0.1)  # float16: no kernel, fused=None falls back
    opt.step()
    assert p.dtype == torch.float16 and torch.all(p < 1)


# --------------------------------------------------------------------------------------------
# One hyperparameter layout (Note [hyperparameter layout])
# --------------------------------------------------------------------------------------------


def _c_struct(name: str, source: str) -> list[tuple[str, str]]:
    """``(field, C type)`` of ``typedef struct { ... } name;`` in a C source, in order."""
    text = (Path(_cpu.__file__).parent / source).read_text()
    body = re.search(r"typedef struct \{([^}]*)\} " + name + ";", text).group(1)
    body = re.sub(r"/\*.*?\*/", "", body, flags=re.S)
    fields = []
    for declaration in filter(None, (d.strip() for d in body.split(";"))):
        kind, names = declaration.split(None, 1)
        fields += [(field.strip(), kind) for field in names.split(",")]
    return fields


def test_the_c_structs_ctypes_and_triton_columns_share_one_layout():
    """The C kernels' hyperparameter structs declare the fields of steadystep._kernels.layout
    in its order, the ctypes structs are made from it, and the Triton columns are named by it."""
    cprop = [(name, "double") for name in layout.CPROP_HYPER_FIELDS]
    assert _c_struct("hyper_t", "kernels_cprop.c") == cprop
    assert _c_struct("alera_hyper_t", "kernels_alera.c") == list(layout.ALERA_HYPER_FIELDS)
    assert [name for name, _ in _cpu.Hyper._fields_] == list(layout.CPROP_HYPER_FIELDS)
    assert [name for name, _ in _cpu.AleraHyper._fields_] == [
        name for name, _ in layout.ALERA_HYPER_FIELDS
    ]
    row = layout.cprop_hyper_row(
        cdf_constant=0.5, lr=0.1, cprop_beta=0.9, cprop_c=math.inf, cprop_eps=1e-8
    )
    assert row[layout.column("lr")] == 0.1 and row[layout.column("cprop_c")] == 1.0
    if __import__("importlib").util.find_spec("triton") is not None:
        from steadystep._kernels import _triton_cprop

        for i, name in enumerate(layout.CPROP_HYPER_FIELDS):
            assert getattr(_triton_cprop, f"H_{name.upper()}").value == i


# --------------------------------------------------------------------------------------------
# Triton kernels, interpreted on the CPU
# --------------------------------------------------------------------------------------------

PARITY = ROOT / "tests" / "kernel_parity.py"


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("triton") is None, reason="needs Triton installed"
)
def test_triton_kernels_match_the_reference_under_the_interpreter():
    """Every Triton kernel (CProp's Adam/SGD/wrapper passes, ALeRA and Ag-Adam in every
    granularity, the gradient check, the rollback) against the reference paths, on CPU tensors
    under ``TRITON_INTERPRET=1`` (a fresh process: Triton reads it at import)."""
    out = _fresh_process(PARITY.read_text(), {"TRITON_INTERPRET": "1"})
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "all kernels match" in out.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_kernels_match_the_reference():
    """The same runs with the Triton kernels compiled for the GPU."""
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        import kernel_parity
    finally:
        sys.path.pop(0)
    kernel_parity.run("cuda")


def test_the_cpu_kernels_leave_the_threads_floating_point_mode_as_they_found_it():
    """Note [subnormals in the kernels]: each thread flushes subnormals while it runs its range
    and restores its mode; torch's own ops on the calling thread still see subnormals after."""
    torch.set_flush_denormal(False)
    sub = torch.tensor([1e-39], dtype=torch.float32)
    assert float(sub * 1.0) > 0  # a subnormal survives a multiply before the step
    params = [torch.nn.Parameter(torch.randn(4096)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn_like(p)
    from steadystep._kernels._common import backend

    assert backend(params, [p.grad for p in params]) == "cpu"  # the C kernels take this step
    ss.CPropAdamW(params, lr=1e-3).step()
    assert float(sub * 1.0) > 0  # and after it


def test_a_copy_plan_follows_new_memory_and_starts_empty_in_a_copy():
    """Note [copy plans]: the kept C arguments are reused only for the same tensors at the same
    memory; new memory behind a parameter, another list or a resized tensor is checked afresh
    (a size mismatch refuses, touching nothing), and a deepcopy's plan starts empty."""
    import copy

    from steadystep._kernels.rollback import CopyPlan, rollback_

    no, yes = torch.tensor(False), torch.tensor(True)
    live = [torch.randn(4), torch.randn(3, dtype=torch.float64)]
    copies = [torch.empty(4), torch.empty(3, dtype=torch.float64)]
    plan = CopyPlan()
    assert rollback_(live, copies, no, plan=plan)  # refresh: copies <- live
    assert all(torch.equal(c, t) for c, t in zip(copies, live, strict=True))
    assert plan.args(live, copies) is not None
    live[0].data = torch.randn(4)  # the same object, new memory
    assert plan.args(live, copies) is None
    assert rollback_(live, copies, no, plan=plan)
    assert torch.equal(copies[0], live[0])
    other = [torch.randn(4), torch.randn(3, dtype=torch.float64)]
    assert rollback_(other, copies, no, plan=plan)
    assert torch.equal(copies[1], other[1])
    copies[0].fill_(7.0)
    assert rollback_(other, copies, yes, plan=plan)  # restore: live <- copies
    assert torch.equal(other[0], torch.full((4,), 7.0))
    before = [c.clone() for c in copies]
    other[1].data = torch.randn(5, dtype=torch.float64)  # resized: the sizes no longer match
    assert not rollback_(other, copies, no, plan=plan)
    assert all(torch.equal(c, b) for c, b in zip(copies, before, strict=True))
    assert copy.deepcopy(plan).args(other, copies) is None


def test_the_threaded_kernels_match_one_thread():
    """Above half a million elements the C kernels split the work over threads (SS_MIN_WORK in
    kernels_common.h): every elementwise result is bitwise what one thread computes, and the
    gradient check's sum of squares agrees to the order of a sum."""
    from steadystep._kernels._common import grad_stats
    from steadystep._kernels.rollback import rollback_

    threads = torch.get_num_threads()
    shapes = [(1200, 1000), (1000,), (300, 700)]  # 1.4M elements, 5.6 MB: two ranges each
    torch.manual_seed(0)
    start = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(3)]
    results = {}
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            params = [torch.nn.Parameter(t.clone()) for t in start]
            opt = ss.CPropAdamW(params, lr=1e-2, fused=True)
            for gs in grads:
                for p, g in zip(params, gs, strict=True):
                    p.grad = g.clone()
                opt.step()
            copies = [torch.empty_like(p) for p in params]
            assert rollback_([p.detach() for p in params], copies, torch.tensor(False))
            ok, sumsq = grad_stats(grads[0])
            results[n] = ([p.detach().clone() for p in params], copies, bool(ok), float(sumsq))
    finally:
        torch.set_num_threads(threads)
    (p1, c1, ok1, s1), (p2, c2, ok2, s2) = results[1], results[2]
    assert all(torch.equal(a, b) for a, b in zip(p1, p2, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(c1, c2, strict=True))
    assert ok1 and ok2 and s1 == pytest.approx(s2, rel=1e-12)


def test_a_large_rollback_copies_bitwise_with_streaming_stores():
    """Note [streaming copies]: a call that copies 16 MB or more streams its stores; the copies
    are bitwise in both directions, from and to tensors that do not start on a 16-byte line,
    with sizes that are no multiple of the 64-byte block, NaN and inf included."""
    from steadystep._kernels.rollback import rollback_

    torch.manual_seed(0)
    base = torch.randn(3_000_001)
    live = [
        base[1:],
        torch.randn(2_000_003, dtype=torch.float64),
        torch.randn(7, dtype=torch.bfloat16),
    ]
    live[1][5], live[1][6] = math.nan, math.inf
    copies = [torch.empty_like(t) for t in live]
    assert sum(t.nbytes for t in live) >= 16 << 20 and live[0].data_ptr() % 16
    assert rollback_(live, copies, torch.tensor(False))  # refresh: copies <- live
    assert all(
        torch.equal(c.view(torch.uint8), t.view(torch.uint8))
        for c, t in zip(copies, live, strict=True)
    )
    saved = [t.clone() for t in live]
    for t in live:
        t.zero_()
    assert rollback_(live, copies, torch.tensor(True))  # restore: live <- copies
    assert all(
        torch.equal(t.view(torch.uint8), s.view(torch.uint8))
        for t, s in zip(live, saved, strict=True)
    )
