"""Data-parallel training through optd, started the torchrun way (gloo, on the CPU):

    /usr/bin/python3 -m torch.distributed.run --standalone --nproc_per_node=2 \
        --redirects 1 --tee 1 examples/train_ddp.py --server 127.0.0.1:50051 [--ddp]

(--redirects 1 --tee 1 only because Debian's torch 1.13 on Python 3.11 cannot parse their
default.)
Without --ddp optd is the gradient reducer: each rank sends its own gradients as a worker of
one shared session, the daemon steps their mean, every rank gets the same parameters. With --ddp
the model is wrapped in DistributedDataParallel, which reduces the gradients; rank 0 steps them
through optd and the new parameters are broadcast."""
import argparse

import torch
import torch.distributed as dist

import optd
from optd.torch import RemoteOptimizer

parser = argparse.ArgumentParser()
parser.add_argument("--server", required=True, help="host:port of a running optd")
parser.add_argument("--ddp", action="store_true", help="reduce with DDP instead of optd")
parser.add_argument("--steps", type=int, default=60)
args = parser.parse_args()

dist.init_process_group("gloo")  # RANK, WORLD_SIZE, MASTER_ADDR/PORT from torchrun
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 64),
                            torch.nn.GELU(), torch.nn.Linear(64, 1))
if args.ddp:
    model = torch.nn.parallel.DistributedDataParallel(model)
with optd.Client(args.server) as client, \
        RemoteOptimizer(model.named_parameters(), client, preset="keller", lr=0.02,
                        grad_reduce="ddp" if args.ddp else "optd") as optimizer:
    for step in range(1, args.steps + 1):
        # Each rank its own slice of the data.
        x = torch.randn(64, 16, generator=torch.Generator().manual_seed(step * world + rank))
        loss = torch.nn.functional.mse_loss(model(x), x[:, :4].sum(1, keepdim=True).sin())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if rank == 0 and step % 20 == 0:
            print(f"step {step}: loss {loss.item():.4f} on rank 0", flush=True)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    every = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(every, flat)
    assert all(torch.equal(other, flat) for other in every), "the ranks' parameters differ"
    if rank == 0:
        print(f"{world} ranks, one session ({optimizer.session.id}), "
              f"{optimizer.steps} steps: every rank holds the same parameters", flush=True)
del model, optimizer  # DDP's reducer before its process group
dist.destroy_process_group()
