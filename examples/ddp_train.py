"""Data-parallel training with steadystep under torchrun (CPU gloo or CUDA nccl).

    torchrun --nproc_per_node=2 --standalone examples/ddp_train.py --steps 50

ALRC, the catastrophe guard and CProp around AdamW, composed by ``ss.stabilize``: the gradient
comes from the clipped per-sample losses, the guard watches their raw mean. Every rank sees
different data; ALRC's moments and the guard's loss are averaged over ranks, so every rank clips,
alarms, rolls back and cuts its learning rate alike, and the parameters stay bitwise equal
(checked at the end). Rank 0 writes a Monitor CSV (``--csv``).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import steadystep as ss


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--spike-step", type=int, default=None, help="corrupt rank 1's batch here")
    parser.add_argument("--csv", default=None, help="Monitor CSV written by rank 0")
    args = parser.parse_args(argv)

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if use_cuda else "cpu")

    torch.manual_seed(0)  # the same initial weights on every rank
    net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    net = net.to(device)
    model = DDP(net)
    batch = 32
    # ALRC and CProp are opt-in (docs/clean.md); this example composes all three
    opt = ss.stabilize(torch.optim.AdamW(net.parameters(), lr=1e-2), alrc=True, cprop=True)
    # one Monitor on rank 0 is enough: the statistics are the same on every rank
    # columns named as opt.stats() names them: guard/alarms, alrc/threshold, ...
    monitor = ss.Monitor(opt, every=10, csv_path=args.csv)

    g = torch.Generator().manual_seed(1000 + rank)  # different data on every rank
    spike = args.spike_step if args.spike_step is not None else args.steps // 2
    for step in range(args.steps):
        x = torch.randn(batch, 8, generator=g)
        y = x[:, :1] * 2.0 - x[:, 1:2]
        if rank == 1 % world and step == spike:
            y = y * 100.0  # a corrupted batch on one rank only
        x, y = x.to(device), y.to(device)
        per_sample = (model(x) - y).pow(2).squeeze(1)
        loss = opt.clip(per_sample).mean()  # ALRC; the raw mean is kept for the guard
        opt.zero_grad()
        loss.backward()
        opt.step()  # the guard watches the raw loss (its rank mean), CProp scales AdamW
        if rank == 0:
            monitor.step(loss=loss.detach())
    monitor.close()

    # every rank holds the same parameters: compare with rank 0's
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    reference = flat.clone()
    dist.broadcast(reference, src=0)
    same = bool(torch.equal(flat, reference))
    stats = {k: float(v) for k, v in opt.stats().items() if v.numel() == 1}
    print(
        f"rank {rank}/{world}: loss {float(loss.detach()):.4f}, "
        f"ALRC clipped {int(stats['alrc/clipped_total'])}, "
        f"guard alarms {int(stats['guard/alarms'])}, params equal to rank 0: {same}",
        flush=True,
    )
    dist.destroy_process_group()
    if not same:
        raise SystemExit(f"rank {rank}: parameters differ from rank 0")


if __name__ == "__main__":
    main()
