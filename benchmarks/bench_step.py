"""The whole training step (forward + backward + optimizer) of each arm against plain torch AdamW.

Every arm trains its own copy of the same model (same initialization, same batches) with the
usual loop of that arm, and all arms of one model are timed round-robin in one process
(``common.time_interleaved_samples``): a ratio is the median over rounds of the arm's time over
plain AdamW's time in the same round (``common.paired_ratios``). The arms:

* ``torch AdamW``: the baseline, ``torch.optim.AdamW(fused=True)`` where torch has the fused
  kernel for the device (else its default), ``loss.backward(); opt.step()``;
* ``guard(AdamW)``: ``ss.CatastropheGuard`` around that same AdamW, ``opt.step(loss=loss)``;
* ``stabilize(AdamW)``: ``ss.stabilize`` around that same AdamW with its defaults
  (``model=model``), ``loss = opt.clip(per_sample).mean(); loss.backward(); opt.step()``;
* ``CPropAdamW``, ``CPropSGD`` (momentum 0.9), ``ALeRA``, ``AgAdam`` (both on
  ``ss.layer_groups(model)``): the native optimizers, default arguments;
* ``SALeRA``: on ``ss.layer_groups(model)``, ``opt.step(loss=loss)``.

Models (``--device cpu``, the default, on one torch thread unless ``--threads``): ``mlp-40k``
(40-300-100-10, 43k parameters, batch 128), ``char-lm`` (a causal character transformer: 2
layers, d=64, 4 heads, 64 characters of context, batch 16), ``mlp-8m`` (8 layers of 1024 x 1024,
8.4M parameters, batch 128). ``--device cuda``: ``gpt-125m`` (12 layers, d=768, batch 8) and
``gpt-350m`` (24 layers, d=1024, batch 4), GPT-2-like with a 50304-token vocabulary and 1024
positions, bfloat16 autocast, fp32 parameters; written to ``step_gpu.json``. Every arm keeps
its own model, so the 350M model needs about 60 GB of device memory.

The targets (issue 21) are for the guard and the recipe: within 1.05x of plain on ``char-lm``
and ``mlp-8m``, 1.3x on ``mlp-40k``, 1.03x on the GPU models; the other arms carry no target.

Host work (``host_us``): the microseconds per step that the guard and the recipe spend on the
host beyond plain AdamW's step. Measured on the model's own number of parameter tensors, each
of one element, so that the kernels have (almost) nothing to compute: the step of
``guard(AdamW)`` (and ``clip`` of one batch of losses + ``step`` of ``stabilize(AdamW)``) is
timed round-robin with plain AdamW's step on such tensors, gradients fixed, and the difference
of the medians is reported (it includes the dispatch of each extra per-tensor operation, which
is host work too). On CUDA the kernels on one-element tensors take less time than their
launches, so the same difference, timed with CUDA events, measures the host too.

    PYTHONPATH=src python benchmarks/bench_step.py                 # writes results/step.json
    PYTHONPATH=src python benchmarks/bench_step.py --device cuda   # writes results/step_gpu.json
"""

from __future__ import annotations

import argparse
import gc
import itertools
import statistics
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

import steadystep as ss  # noqa: E402
from common import (  # noqa: E402
    machine_info,
    paired_ratios,
    time_interleaved_samples,
    write_result,
)

PLAIN = "torch AdamW"
GUARD = "guard(AdamW)"
RECIPE = "stabilize(AdamW)"
ARMS = [PLAIN, GUARD, RECIPE, "CPropAdamW", "CPropSGD", "ALeRA", "AgAdam", "SALeRA"]
HOST_ARMS = [GUARD, RECIPE]
LR = 1e-3
# issue 21's targets for the whole step, per model; the other arms have none
TARGETS: dict[str, float] = {
    "mlp-40k": 1.3,
    "char-lm": 1.05,
    "mlp-8m": 1.05,
    "gpt-125m": 1.03,
    "gpt-350m": 1.03,
}
TARGETED = (GUARD, RECIPE)


class _Block(nn.Module):
    """A pre-norm transformer block with causal self-attention."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """A GPT-2-like causal language model (learned positions, untied output head)."""

    def __init__(self, vocab: int, ctx: int, layers: int, d: int, heads: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(ctx, d)
        self.blocks = nn.Sequential(*[_Block(d, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        h = self.embed(tokens) + self.pos(positions)
        return self.head(self.norm(self.blocks(h)))


def mlp(widths: list[int]) -> nn.Module:
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class Spec:
    """A model, the shape of its batches and a line that describes both."""

    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[torch.Generator, torch.device], tuple[torch.Tensor, torch.Tensor]]
    description: str
    batch_size: int


def mlp_spec(name: str, widths: list[int], batch: int, label: str) -> Spec:
    def data(gen: torch.Generator, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(batch, widths[0], generator=gen)
        y = torch.randint(0, widths[-1], (batch,), generator=gen)
        return x.to(device), y.to(device)

    return Spec(name, lambda: mlp(widths), data, f"MLP {label}, batch {batch}", batch)


def lm_spec(
    name: str, vocab: int, ctx: int, layers: int, d: int, heads: int, batch: int, label: str
) -> Spec:
    def data(gen: torch.Generator, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.randint(0, vocab, (batch, ctx + 1), generator=gen)
        return tokens[:, :-1].to(device), tokens[:, 1:].to(device)

    return Spec(
        name,
        lambda: GPT(vocab, ctx, layers, d, heads),
        data,
        f"{label}: {layers} layers, d={d}, {heads} heads, vocabulary {vocab}, context {ctx}, "
        f"batch {batch}",
        batch,
    )


def specs(quick: bool) -> dict[str, Spec]:
    """Every model by name; ``quick`` shrinks the large ones (for the test)."""
    return {
        "mlp-40k": mlp_spec("mlp-40k", [40, 300, 100, 10], 128, "40-300-100-10"),
        "char-lm": lm_spec(
            "char-lm", 64, 32 if quick else 64, 2, 64, 4, 8 if quick else 16, "character LM"
        ),
        "mlp-8m": (
            mlp_spec("mlp-8m", [256] * 4, 32, "3 layers of 256 x 256 (--quick)")
            if quick
            else mlp_spec("mlp-8m", [1024] * 9, 128, "8 layers of 1024 x 1024")
        ),
        "gpt-125m": lm_spec("gpt-125m", 50304, 1024, 12, 768, 12, 8, "GPT-like"),
        "gpt-350m": lm_spec("gpt-350m", 50304, 1024, 24, 1024, 16, 4, "GPT-like"),
    }


def plain_adamw(params: list[nn.Parameter]) -> torch.optim.AdamW:
    """torch's AdamW, fused where torch has the fused kernel for the parameters' device."""
    try:
        return torch.optim.AdamW(params, lr=LR, fused=True)
    except RuntimeError:  # no fused kernel for this device or dtype
        return torch.optim.AdamW(params, lr=LR)


def build_optimizer(arm: str, model: nn.Module) -> Any:
    params = list(model.parameters())
    if arm == PLAIN:
        return plain_adamw(params)
    if arm == GUARD:
        return ss.CatastropheGuard(plain_adamw(params))
    if arm == RECIPE:
        return ss.stabilize(plain_adamw(params), model=model)
    if arm == "CPropAdamW":
        return ss.CPropAdamW(params, lr=LR)
    if arm == "CPropSGD":
        return ss.CPropSGD(params, lr=LR, momentum=0.9)
    if arm == "ALeRA":
        return ss.ALeRA(ss.layer_groups(model), lr=LR)
    if arm == "AgAdam":
        return ss.AgAdam(ss.layer_groups(model), lr=LR)
    if arm == "SALeRA":
        return ss.SALeRA(ss.layer_groups(model), lr=LR)
    raise ValueError(f"unknown arm {arm!r}")


def autocast(device: torch.device) -> AbstractContextManager[Any]:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def train_step(
    arm: str,
    model: nn.Module,
    opt: Any,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
) -> Callable[[], None]:
    """One training step of ``arm`` per call, cycling through ``batches``."""
    counter = iter(range(sys.maxsize))

    def per_sample_losses() -> torch.Tensor:
        x, y = batches[next(counter) % len(batches)]
        with autocast(device):
            logits = model(x)
        losses = F.cross_entropy(logits.float().flatten(0, -2), y.flatten(), reduction="none")
        return losses.view(y.shape).mean(tuple(range(1, y.dim()))) if y.dim() > 1 else losses

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        per_sample = per_sample_losses()
        if arm == RECIPE:
            opt.clip(per_sample).mean().backward()
            opt.step()
            return
        loss = per_sample.mean()
        loss.backward()
        if arm in (GUARD, "SALeRA"):
            opt.step(loss=loss.detach())
        else:
            opt.step()

    return step


def host_steps(tensors: int, batch: int, device: torch.device) -> dict[str, Callable[[], None]]:
    """The optimizer side of plain, guard and recipe on ``tensors`` one-element parameters."""

    def fresh() -> list[nn.Parameter]:
        ps = [nn.Parameter(torch.full((1,), 0.5, device=device)) for _ in range(tensors)]
        for p in ps:
            p.grad = torch.full((1,), 1e-3, device=device)
        return ps

    loss = torch.ones((), device=device)
    losses = torch.ones(batch, device=device)
    plain = plain_adamw(fresh())
    guard = ss.CatastropheGuard(plain_adamw(fresh()))
    recipe = ss.stabilize(plain_adamw(fresh()))

    def recipe_step() -> None:
        recipe.clip(losses).mean()
        recipe.step()

    return {
        PLAIN: plain.step,
        GUARD: lambda: guard.step(loss=loss),
        RECIPE: recipe_step,
    }


def host_us(
    tensors: int, batch: int, device: torch.device, rounds: int, inner: int
) -> dict[str, float]:
    samples = time_interleaved_samples(
        host_steps(tensors, batch, device), device=device, warmup=5, repeats=rounds, inner=inner
    )
    base = statistics.median(samples[PLAIN])
    return {arm: (statistics.median(samples[arm]) - base) * 1e6 for arm in HOST_ARMS}


def run_model(
    spec: Spec, device: torch.device, rounds: int, inner: int, host_rounds: int
) -> dict[str, Any]:
    fns: dict[str, Callable[[], None]] = {}
    baseline = PLAIN
    n_params = tensors = 0
    for arm in ARMS:
        torch.manual_seed(0)  # every arm starts from the same weights and sees the same batches
        with device:  # built where it trains (a 350M model initializes faster on the GPU)
            model = spec.build()
        n_params = sum(p.numel() for p in model.parameters())
        tensors = len(list(model.parameters()))
        gen = torch.Generator().manual_seed(1)
        batches = [spec.batch(gen, device) for _ in range(4)]
        opt = build_optimizer(arm, model)
        if arm == PLAIN and opt.defaults.get("fused"):
            baseline = f"{PLAIN} fused"
        fns[arm] = train_step(arm, model, opt, batches, device)
    samples = time_interleaved_samples(fns, device=device, warmup=3, repeats=rounds, inner=inner)
    ratios = paired_ratios(samples, PLAIN)
    del fns, model, opt  # the models and their optimizers
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    host = host_us(tensors, spec.batch_size, device, host_rounds, inner=20)
    target = TARGETS.get(spec.name)
    rows: dict[str, dict[str, Any]] = {}
    for arm in ARMS[1:]:
        arm_target = target if arm in TARGETED else None
        rows[arm] = {
            "ms": statistics.median(samples[arm]) * 1e3,
            "ratio": ratios[arm],
            "target": arm_target,
            "met": None if arm_target is None else ratios[arm] <= arm_target,
            "host_us": host.get(arm),
        }
    return {
        "model": spec.name,
        "description": spec.description,
        "n_params": n_params,
        "tensors": tensors,
        "baseline": baseline,
        "plain_ms": statistics.median(samples[PLAIN]) * 1e3,
        "rounds": rounds,
        "inner": inner,
        "rows": rows,
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        f"#### {result['model']} ({result['n_params'] / 1e6:.3g}M params in "
        f"{result['tensors']} tensors): {result['baseline']} {result['plain_ms']:.2f} ms/step",
        "",
        "| arm | ms/step | ratio | target | met | host us/step |",
        "|---|---|---|---|---|---|",
    ]
    for arm, row in result["rows"].items():
        target = "" if row["target"] is None else f"<= {row['target']}x"
        met = "" if row["met"] is None else ("yes" if row["met"] else "no")
        host = "" if row["host_us"] is None else f"{row['host_us']:.0f}"
        lines.append(
            f"| {arm} | {row['ms']:.2f} | {row['ratio']:.2f}x | {target} | {met} | {host} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--models", nargs="*", help="default: the device's models")
    parser.add_argument("--rounds", type=int, help="timed rounds per model (default 11)")
    parser.add_argument("--inner", type=int, help="steps per arm and round (default 3)")
    parser.add_argument("--quick", action="store_true", help="small models, few rounds")
    parser.add_argument("--name", help="result file name (default step, or step_gpu on cuda)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1, as issue 21)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    cuda = device.type == "cuda"
    models = args.models or (["gpt-125m", "gpt-350m"] if cuda else ["mlp-40k", "char-lm", "mlp-8m"])
    rounds = args.rounds or (2 if args.quick else 11)
    inner = args.inner or (1 if args.quick else 3)
    host_rounds = 3 if args.quick else 11
    name = args.name or ("step_gpu" if cuda else "step")
    catalogue = specs(args.quick)
    results = []
    for model in models:
        results.append(run_model(catalogue[model], device, rounds, inner, host_rounds))
        print(table(results[-1]) + "\n", flush=True)
    payload = {
        "benchmark": name,
        "machine": machine_info(device),
        "settings": {
            "quick": args.quick,
            "rounds": rounds,
            "inner": inner,
            "host_rounds": host_rounds,
            "lr": LR,
        },
        "results": results,
    }
    path = write_result(args.out, name, payload)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
