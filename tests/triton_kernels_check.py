"""Run every Triton kernel of steadystep._kernels on CPU tensors under TRITON_INTERPRET=1 and
compare whole optimizer runs with the reference (eager) paths.

Not a test module: tests/test_kernels.py runs it in a fresh process (Triton reads
TRITON_INTERPRET when it is imported). The kernels' entry points are made to take the CUDA
(Triton) branch for CPU tensors, so the code that runs is the code a GPU runs.
"""

from __future__ import annotations

import math
import os

import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import steadystep as ss  # noqa: E402
from steadystep._kernels import _common, alera, cprop  # noqa: E402


def _triton_for_cpu(real):
    def backend(*lists, any_dtype=False):
        found = real(*lists, any_dtype=any_dtype)
        return "cuda" if found == "cpu" else found

    return backend


_backend = _triton_for_cpu(_common._backend)
for module in (_common, cprop, alera):
    module._backend = _backend
assert _common._triton() is not None, "Triton does not import"


def model(dtype, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).to(
        dtype
    )


def train(net, opt, steps, dtype, bad_at=(), guarded=False):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, 6, generator=gen).to(dtype)
    y = torch.randn(32, 3, generator=gen).to(dtype)
    for i in range(steps):
        opt.zero_grad()
        loss = (net(x * (1 + i % 3)) - y).pow(2).mean()
        loss.backward()
        if i in bad_at:
            huge = 1e300 if dtype == torch.float64 else 1e30  # above the gradient limit
            next(net.parameters()).grad[0, 0] = math.nan if i % 2 else huge
        if guarded:
            opt.step(loss=loss.detach() * (50.0 if i == steps - 2 else 1.0))
        else:
            opt.step()


def state_tensors(opt):
    sd = opt.state_dict()
    out = []

    def walk(x):
        if torch.is_tensor(x):
            out.append(x.double())
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                walk(x[k])
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(sd)
    return out


def compare(name, make, dtype, atol, steps=7, guarded=False):
    a, b = model(dtype), model(dtype)
    ref, fused = make(a.parameters(), False), make(b.parameters(), True)
    # a NaN and a 1e30 gradient element; not for the wrapper around torch's eager optimizers,
    # whose own state the wrapper does not protect (that is the guard's job)
    bad_at = () if name.startswith("CProp(") else (2, 3)
    train(a, ref, steps, dtype, bad_at=bad_at, guarded=guarded)
    train(b, fused, steps, dtype, bad_at=bad_at, guarded=guarded)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.isfinite(pb).all(), name
        torch.testing.assert_close(pa.double(), pb.double(), atol=atol, rtol=0, msg=name)
    sa, sb = state_tensors(ref), state_tensors(fused)
    assert len(sa) == len(sb), name
    for x, y in zip(sa, sb, strict=True):
        torch.testing.assert_close(x, y, atol=max(atol, 1e-6), rtol=1e-5, equal_nan=True, msg=name)
    print(f"ok {name} {dtype}")


def groups(params):
    params = list(params)
    return [{"params": params[:2]}, {"params": params[2:]}]


CASES = {
    "CPropAdamW": lambda ps, f: ss.CPropAdamW(ps, lr=1e-2, fused=f),
    "CPropAdam amsgrad L2 own-v": lambda ps, f: ss.CPropAdam(
        ps, lr=1e-2, amsgrad=True, weight_decay=0.1, cprop_beta=0.99, fused=f
    ),
    "CPropAdamW c=2 bft": lambda ps, f: ss.CPropAdamW(ps, lr=1e-2, cprop_c=2.0, cdf="bft", fused=f),
    "CPropSGD nesterov": lambda ps, f: ss.CPropSGD(
        ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01, fused=f
    ),
    "CPropSGD relative": lambda ps, f: ss.CPropSGD(
        ps, lr=0.1, momentum=0.5, dampening=0.2, method="relative", fused=f
    ),
    "CProp(AdamW)": lambda ps, f: ss.CProp(torch.optim.AdamW(ps, lr=1e-2), fused=f),
    "CProp(SGD) moment c=inf": lambda ps, f: ss.CProp(
        torch.optim.SGD(ps, lr=0.1), method="moment", c=math.inf, fused=f
    ),
}
for gran in ("global", "group", "tensor", "param"):
    CASES[f"ALeRA {gran}"] = lambda ps, f, g=gran: ss.ALeRA(
        groups(ps), lr=0.05, C=3e-3, granularity=g, weight_decay=0.01, fused=f
    )
    CASES[f"AgAdam {gran}"] = lambda ps, f, g=gran: ss.AgAdam(
        groups(ps), lr=1e-2, C=3e-3, granularity=g, fused=f
    )

for dtype, atol in ((torch.float32, 1e-5), (torch.float64, 1e-12), (torch.bfloat16, 2e-2)):
    for name, make in CASES.items():
        compare(name, make, dtype, atol)

GUARDED = {
    "SALeRA": lambda ps, f: ss.SALeRA(groups(ps), lr=0.05, rho=0.5, fused=f),
    "guard(CPropAdamW)": lambda ps, f: ss.CatastropheGuard(ss.CPropAdamW(ps, lr=1e-2, fused=f)),
    "guard(AdamW fused)": lambda ps, f: ss.CatastropheGuard(
        torch.optim.AdamW(ps, lr=1e-2, fused=True)
    ),
}
for name, make in GUARDED.items():
    compare(name, make, torch.float32, 1e-5, steps=9, guarded=True)

# the rollback kernel on its own, any dtype, both directions
from steadystep._kernels import rollback_  # noqa: E402

for dtype in (torch.float32, torch.bfloat16, torch.int64, torch.float16):
    ps = [torch.arange(n).to(dtype) for n in (5, 3000)]
    snaps = [torch.zeros_like(p) for p in ps]
    assert rollback_(ps, snaps, torch.tensor(False))
    assert all(torch.equal(s, p) for s, p in zip(snaps, ps, strict=True))
    old = [p.clone() for p in ps]
    for p in ps:
        p.add_(1)
    assert rollback_(ps, snaps, torch.tensor(True))
    assert all(torch.equal(p, o) for p, o in zip(ps, old, strict=True))
print("ok rollback")
print("all Triton kernels match")
