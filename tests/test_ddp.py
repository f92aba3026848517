"""DistributedDataParallel: two processes on the CPU (gloo, localhost) train the paper's
network (method 1 units, fused cpp backend) for a few steps, each on half of every batch;
the gradients and weights equal a one-process run on the whole batches.

float64, so that "equal" can be tight: the only difference between the runs is the order
in which the two halves' gradients are summed."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import msfused
from conftest import require
from msfused.paper.models import PaperNet

STEPS, BATCH = 3, 8


def _net(backend):
    torch.manual_seed(0)
    return PaperNet("ms1", in_channels=1, image_size=16, num_classes=10, backend=backend,
                    dropout=0.0, widths=[4, 6]).double()


def _batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 1, 16, 16, generator=g, dtype=torch.float64),
             torch.randint(0, 10, (BATCH,), generator=g)) for _ in range(STEPS)]


def _train(model, batches, rank=0, world=1):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    grads = []
    for x, t in batches:
        per = BATCH // world
        x, t = x[rank * per:(rank + 1) * per], t[rank * per:(rank + 1) * per]
        opt.zero_grad()
        F.cross_entropy(model(x), t).backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
        opt.step()
    return grads


def _worker(rank, world, port, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        model = torch.nn.parallel.DistributedDataParallel(_net("cpp"))
        grads = _train(model, _batches(), rank, world)
        if rank == 0:
            sd = {k.removeprefix("module."): v for k, v in model.state_dict().items()}
            grads = [{k.removeprefix("module."): v for k, v in g.items()} for g in grads]
            torch.save({"state": sd, "grads": grads}, out)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_one(tmp_path):
    require("cpp")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this PyTorch build")
    out = os.path.join(tmp_path, "ddp.pt")
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    ddp = torch.load(out)
    single = _net("cpp")
    grads = _train(single, _batches())
    assert any(isinstance(m, msfused.MultiScaleSeparableBlock) for m in single.modules())
    for step, (g1, g2) in enumerate(zip(grads, ddp["grads"])):
        assert g1.keys() == g2.keys()
        for k in g1:
            err = ((g1[k] - g2[k]).norm() / g1[k].norm().clamp_min(1e-300)).item()
            assert err < 1e-10, f"step {step} grad {k}: {err:.3g}"
    for k, v in single.state_dict().items():
        err = ((v - ddp["state"][k]).norm() / v.norm().clamp_min(1e-300)).item()
        assert err < 1e-10, f"weight {k}: {err:.3g}"
