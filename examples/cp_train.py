"""Train TinyLM on one long sequence split over processes, next to one process doing the same.

    torchrun --standalone --nproc-per-node 2 examples/cp_train.py [--seq-len 4096 --steps 10]

Each rank holds N/W tokens of every sequence and its loss is its tokens' share of the
whole-sequence mean, so gradients summed over the group are the whole-sequence gradient. Rank 0
also trains a copy on whole sequences in one process and prints both losses (``--check``: exit 1
unless they agree). CPU with gloo; GPUs with ``--backend nccl``, one per rank.
"""

import argparse
import copy
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from relattn.distributed import ContextParallel, shard
from relattn.models import TinyLM, TinyLMConfig

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ints = {"seq-len": 4096, "steps": 10, "d-model": 64, "layers": 2, "heads": 4}
for flag, default in ints.items():
    p.add_argument(f"--{flag}", type=int, default=default)
p.add_argument("--pe", default="t5")
p.add_argument("--strategy", default="ring", choices=["ring", "all_to_all"])
p.add_argument("--layout", default="zigzag", choices=["zigzag", "contiguous"])
p.add_argument("--backend", default="gloo", help="torch.distributed backend")
p.add_argument("--check", action="store_true", help="exit 1 unless the losses agree")
args = p.parse_args()

dist.init_process_group(args.backend)
rank = dist.get_rank()
device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if args.backend == "nccl" else "cpu")
torch.manual_seed(0)
model = TinyLM(TinyLMConfig(d_model=args.d_model, num_layers=args.layers, num_heads=args.heads,
                            pe=args.pe, max_seq_len=args.seq_len)).to(device)  # fmt: skip
single = copy.deepcopy(model)  # rank 0 trains it on whole sequences, in one process
opt, single_opt = (torch.optim.AdamW(m.parameters(), lr=3e-3) for m in (model, single))
cp = ContextParallel(None, args.strategy, args.layout)
g = torch.Generator().manual_seed(0)  # the same stream on every rank: noisy repeats
motif, worst = torch.randint(0, 256, (97,), generator=g), 0.0  # of a motif (long-range signal)
for step in range(args.steps):
    seq = motif.repeat(args.seq_len // 97 + 2)[: args.seq_len + 1]
    noise = torch.rand(seq.shape, generator=g) < 0.1
    seq = torch.where(noise, torch.randint(0, 256, seq.shape, generator=g), seq)
    inputs, targets = seq[None, :-1].to(device), seq[None, 1:].to(device)
    x, y = (shard(t, None, args.layout, dim=1) for t in (inputs, targets))
    logits = model(x, context_parallel=cp)
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum") / targets.numel()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    for param in model.parameters():  # the recipe: sum every gradient over the group
        dist.all_reduce(param.grad)
    opt.step()
    dist.all_reduce(total := loss.detach().clone())
    if rank == 0:
        ref = F.cross_entropy(single(inputs).flatten(0, 1), targets.flatten())
        single_opt.zero_grad(set_to_none=True)
        ref.backward()
        single_opt.step()
        worst = max(worst, diff := abs(total.item() - ref.item()))
        print(f"step {step}: cp loss {total.item():.6f}, one process {ref.item():.6f}, "
              f"|diff| {diff:.2e}", flush=True)  # fmt: skip
dist.barrier()  # every rank's steps are done before the group goes
dist.destroy_process_group()
if rank == 0:  # torchrun fails the run when one rank exits 1
    agree = worst <= 1e-4 * (1 + abs(total.item()))
    print("losses agree" if agree else f"losses DIFFER (worst |diff| {worst:.3g})")
    if args.check and not agree:
        raise SystemExit(1)
