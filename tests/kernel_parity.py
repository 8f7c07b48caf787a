"""Whole optimizer runs on the fused kernels against the reference (eager) paths.

``run(device)`` trains small models with every optimizer and kernel configuration on both
paths, with a NaN and a huge gradient element injected, and compares parameters and state.
On CUDA it runs the Triton kernels as they are; run as a script under ``TRITON_INTERPRET=1``
(tests/test_kernels.py does, in a fresh process: Triton reads the variable when it is
imported) the kernels' entry points take the Triton branch for CPU tensors, so the code that
runs in the interpreter is the code a GPU runs. Not a test module itself.
"""

from __future__ import annotations

import math
import os

import torch

import steadystep as ss
from steadystep._kernels import _common, alera, cprop, rollback, rollback_


def use_triton_on_cpu() -> None:
    """Send CPU tensors down the Triton branch (under ``TRITON_INTERPRET=1``)."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    real = _common.backend

    def backend(*lists, **kwargs):
        found = real(*lists, **kwargs)
        return "cuda" if found == "cpu" else found

    for module in (_common, cprop, alera, rollback):
        module.backend = backend
    assert _common.triton() is not None, "Triton does not import"


def model(dtype, device, seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    return net.to(device, dtype)


def train(net, opt, steps, dtype, bad_at=(), guarded=False):
    gen = torch.Generator().manual_seed(1)
    device = next(net.parameters()).device
    x = torch.randn(32, 6, generator=gen).to(device, dtype)
    y = torch.randn(32, 3, generator=gen).to(device, dtype)
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


def compare(name, make, dtype, atol, device, steps=7, guarded=False):
    a, b = model(dtype, device), model(dtype, device)
    ref, fused = make(a.parameters(), False), make(b.parameters(), True)
    # a NaN and a 1e30 gradient element; not for the wrapper around torch's eager optimizers,
    # whose own state the wrapper does not protect (that is the guard's job)
    bad_at = () if name.startswith("CProp(") else (2, 3)
    train(a, ref, steps, dtype, bad_at=bad_at, guarded=guarded)
    train(b, fused, steps, dtype, bad_at=bad_at, guarded=guarded)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.isfinite(pb).all(), name
        torch.testing.assert_close(pa.double(), pb.double(), atol=atol, rtol=1e-6, msg=name)
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


def run(device: str) -> None:
    """Every case on ``device``; raises at the first mismatch, prints one line per case."""
    for dtype, atol in ((torch.float32, 1e-5), (torch.float64, 1e-12), (torch.bfloat16, 2e-2)):
        for name, make in CASES.items():
            compare(name, make, dtype, atol, device)
    for name, make in GUARDED.items():
        compare(name, make, torch.float32, 1e-5, device, steps=9, guarded=True)
    # the rollback kernel on its own, any dtype, both directions
    for dtype in (torch.float32, torch.bfloat16, torch.int64, torch.float16):
        ps = [torch.arange(n).to(device, dtype) for n in (5, 3000)]
        snaps = [torch.zeros_like(p) for p in ps]
        assert rollback_(ps, snaps, torch.tensor(False, device=device))
        assert all(torch.equal(s, p) for s, p in zip(snaps, ps, strict=True))
        old = [p.clone() for p in ps]
        for p in ps:
            p.add_(1)
        assert rollback_(ps, snaps, torch.tensor(True, device=device))
        assert all(torch.equal(p, o) for p, o in zip(ps, old, strict=True))
    print("ok rollback")
    print("all kernels match")


GUARDED = {
    "SALeRA": lambda ps, f: ss.SALeRA(groups(ps), lr=0.05, rho=0.5, fused=f),
    "guard(CPropAdamW)": lambda ps, f: ss.CatastropheGuard(ss.CPropAdamW(ps, lr=1e-2, fused=f)),
    "guard(AdamW fused)": lambda ps, f: ss.CatastropheGuard(
        torch.optim.AdamW(ps, lr=1e-2, fused=True)
    ),
}

if __name__ == "__main__":
    use_triton_on_cpu()
    run("cpu")
