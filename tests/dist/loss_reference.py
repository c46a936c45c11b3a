"""The fixed problem shared by the distributed loss worker and the single-process reference."""

import torch


def make_problem():
    g = torch.Generator().manual_seed(0)
    proj_s = torch.randn(6, 5, generator=g).requires_grad_()
    proj_t = torch.randn(7, 5, generator=g).requires_grad_()
    scale = torch.tensor(2.0).requires_grad_()
    xs = torch.randn(8, 6, generator=g)
    xt = torch.randn(8, 7, generator=g)
    cases = torch.tensor([0, 1, 2, 3, 3, 4, 5, 5])  # case 3 spans ranks 0 and 1; case 5 twice on rank 1
    texts = torch.tensor([10, 11, 12, 13, 13, 14, 15, 16])
    return proj_s, proj_t, scale, xs, xt, cases, texts
