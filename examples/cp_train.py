"""Train TinyLM on one long sequence split over processes, next to one process doing the same.

    torchrun --standalone --nproc-per-node 2 examples/cp_train.py [--seq-len 4096 --steps 10]

Every rank holds N/W tokens (zigzag layout) of each training sequence; attention runs through
``relattn.distributed`` and each step's gradients are summed over the group (each rank's loss
is its tokens' share of the mean over the whole sequence, so the sum is the whole-sequence
gradient). Rank 0 also trains a copy of the model on the whole sequence in one process and
prints both losses side by side; with ``--check`` the script fails if they differ.

Runs on CPU with gloo; on GPUs, launch with NCCL (``--backend nccl``) and one device per rank.
"""

from __future__ import annotations

import argparse
import copy
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from relattn.distributed import ContextParallel, shard
from relattn.models import TinyLM, TinyLMConfig


def batches(args, vocab: int):
    """The same synthetic stream on every rank: noisy repeats of a short motif, so there is
    something to learn at long range (and the loss falls within a few steps)."""
    g = torch.Generator().manual_seed(args.seed)
    motif = torch.randint(0, vocab, (97,), generator=g)
    for _ in range(args.steps):
        start = int(torch.randint(0, 97, (1,), generator=g))
        seq = motif.roll(-start).repeat(args.seq_len // 97 + 2)[: args.seq_len + 1]
        noise = torch.rand(seq.shape, generator=g) < 0.1
        seq = torch.where(noise, torch.randint(0, vocab, seq.shape, generator=g), seq)
        yield seq[None, :-1], seq[None, 1:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--pe", default="t5")
    p.add_argument("--strategy", default="ring", choices=["ring", "all_to_all"])
    p.add_argument("--layout", default="zigzag", choices=["zigzag", "contiguous"])
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="gloo", help="torch.distributed backend")
    p.add_argument("--check", action="store_true", help="exit 1 unless the losses agree")
    args = p.parse_args()

    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if args.backend != "nccl":
        device = torch.device("cpu")
    torch.manual_seed(args.seed)
    cfg = TinyLMConfig(vocab_size=256, d_model=args.d_model, num_layers=args.layers,
                       num_heads=args.heads, pe=args.pe, max_seq_len=args.seq_len)  # fmt: skip
    model = TinyLM(cfg).to(device)
    single = copy.deepcopy(model) if rank == 0 else None
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    single_opt = torch.optim.AdamW(single.parameters(), lr=args.lr) if single else None
    cp = ContextParallel(None, args.strategy, args.layout)
    worst = 0.0
    if rank == 0:
        print(f"TinyLM {model.num_parameters()} parameters, N = {args.seq_len} tokens over "
              f"{world} ranks ({args.strategy}, {args.layout})")  # fmt: skip
    for step, (inputs, targets) in enumerate(batches(args, cfg.vocab_size)):
        inputs, targets = inputs.to(device), targets.to(device)
        x, y = shard(inputs, None, args.layout, dim=1), shard(targets, None, args.layout, dim=1)
        logits = model(x, context_parallel=cp)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum")
        loss = loss / targets.numel()  # this rank's share of the whole-sequence mean
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for param in model.parameters():  # the recipe: sum every gradient over the group
            dist.all_reduce(param.grad)
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        if single is not None:
            ref = F.cross_entropy(single(inputs).flatten(0, 1), targets.flatten())
            single_opt.zero_grad(set_to_none=True)
            ref.backward()
            single_opt.step()
            diff = abs(total.item() - ref.item())
            worst = max(worst, diff)
            print(f"step {step}: cp loss {total.item():.6f}   single-process loss "
                  f"{ref.item():.6f}   |diff| {diff:.2e}", flush=True)  # fmt: skip
    ok = torch.tensor([int(worst <= 1e-4 * (1 + abs(total.item())))], device=device)
    dist.broadcast(ok, src=0)
    if rank == 0:
        print("losses agree" if ok.item() else f"losses DIFFER (worst |diff| {worst:.3g})")
    dist.destroy_process_group()
    if args.check and not ok.item():
        raise SystemExit(1)


if __name__ == "__main__":
    main()
