"""Run under ``torchrun --nproc_per_node 2``: the loss of 2 ranks × 4 rows must equal 1 process × 8 rows.

Rank r takes rows [4r, 4r + 4) of a fixed batch of 8 whose case 3 is split across the ranks. Gradients are
averaged across ranks exactly as DDP does; rank 0 saves the mean loss and the averaged gradients.
"""

import sys

import torch
import torch.distributed as dist

sys.path.insert(0, sys.argv[2])  # repo root, for wsi_clip in a plain checkout
from loss_reference import make_problem  # noqa: E402
from wsi_clip.losses import multi_positive_contrastive_loss  # noqa: E402


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    proj_s, proj_t, scale, xs, xt, cases, texts = make_problem()
    rows = slice(rank * 4, rank * 4 + 4)
    out = multi_positive_contrastive_loss(xs[rows] @ proj_s, xt[rows] @ proj_t, scale.exp(), cases[rows], texts[rows])
    out.loss.backward()
    grads = []
    for p in (proj_s, proj_t, scale):
        g = p.grad.clone()
        dist.all_reduce(g)
        grads.append(g / world)  # DDP averages gradients
    loss = out.loss.detach().clone()
    dist.all_reduce(loss)
    if rank == 0:
        torch.save({"loss": loss / world, "grads": grads}, out_path)
    dist.barrier()  # nobody tears down while a peer may still be inside a collective
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
