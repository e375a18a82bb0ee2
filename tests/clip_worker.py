"""Gradient clipping under real DeepSpeed (gloo, CPU, torchrun), driven by tests/test_export.py.

Each rank computes with plain torch, on a copy of a small MLP, S = the sum over 4 micro-batches of
the rank-averaged micro-batch mean gradients (what HF Trainer + DeepSpeed with scale_wrt_gas=False
accumulates for JanusVLN) and both clip coefficients at C = |S|/2: the reference's
min(1, C / (|S| + 1e-6)) on S and the mean rule's min(1, C / (|S|/A + 1e-6)) on S/A. Then it trains
the same step through janus_job.train.engine.micro_step with `--clip-mode` and records the norm of
the gradient AdamW receives; rank 0 writes the coefficients, DeepSpeed's norm and the coefficient
DeepSpeed applied as JSON.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
import torch.distributed as dist
from torch import nn

ACCUMULATION = 4
LR = 0.01


class Output:
    def __init__(self, loss):
        self.loss = loss


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))

    def forward(self, x, y):
        return Output(((self.body(x) - y) ** 2).mean())


def main() -> None:
    import deepspeed

    from janus_job.train.distributed import skip_cpu_shm_collectives
    from janus_job.train.engine import micro_step
    from janus_job.train.shutdown import release_distributed

    parser = argparse.ArgumentParser()
    parser.add_argument("--clip-mode", required=True)
    parser.add_argument("--clip-fraction", type=float, default=0.5, help="gradient_clipping as a fraction of |S|")
    parser.add_argument("--stage", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    skip_cpu_shm_collectives()
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(0)
    net = Net()
    reference = copy.deepcopy(net)
    generator = torch.Generator().manual_seed(100 + rank)
    batches = [{"x": torch.randn(3, 8, generator=generator), "y": 3 * torch.randn(3, 1, generator=generator)}
               for _ in range(ACCUMULATION)]

    # the reference rule, by hand: per micro-batch mean-loss gradients, averaged over ranks, summed
    summed = [torch.zeros_like(p) for p in reference.parameters()]
    for batch in batches:
        reference.zero_grad()
        reference(**batch).loss.backward()
        for total, param in zip(summed, reference.parameters()):
            grad = param.grad.clone()
            dist.all_reduce(grad)
            total += grad / world
    norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in summed)))
    clip = norm * args.clip_fraction  # between |S|/A and |S|: the sum rule clips, the mean rule does not
    sum_coef = min(1.0, clip / (norm + 1e-6))
    mean_coef = min(1.0, clip / (norm / ACCUMULATION + 1e-6))

    optimizer = torch.optim.AdamW(net.parameters(), lr=LR, eps=1e-8, weight_decay=0.0)
    seen = []  # squared norm of the gradient AdamW receives (this rank's partition)
    optimizer.register_step_pre_hook(lambda opt, *_: seen.append(sum(
        float((p.grad.double() ** 2).sum()) for group in opt.param_groups for p in group["params"]
        if p.grad is not None)))
    config = {
        "train_batch_size": 3 * ACCUMULATION * world,
        "train_micro_batch_size_per_gpu": 3,
        "gradient_accumulation_steps": ACCUMULATION,
        "gradient_clipping": clip,
        "zero_optimization": {"stage": args.stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    engine, _, _, _ = deepspeed.initialize(model=net, optimizer=optimizer, config=config)
    for batch in batches:
        micro_step(engine, batch, torch.device("cpu"), clip_mode=args.clip_mode)
    seen_sq = torch.tensor([seen[-1] if seen else 0.0], dtype=torch.float64)
    dist.all_reduce(seen_sq)  # ZeRO partitions are disjoint: the sum over ranks is the full norm
    seen_norm = float(seen_sq.sqrt())
    # the gradient handed to AdamW is coefficient x (S for the sum rule, S/A for the mean rule)
    unclipped = norm if args.clip_mode == "sum" else norm / ACCUMULATION
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"norm_of_sum": norm, "clip": clip, "deepspeed_norm": float(engine.get_global_grad_norm()),
                       "sum_coef": sum_coef, "mean_coef": mean_coef, "adamw_grad_norm": seen_norm,
                       "applied_coef": seen_norm / unclipped}, f)
    release_distributed(engine)  # the product's end of run: every group and its threads released


if __name__ == "__main__":
    main()
