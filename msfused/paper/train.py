"""`msfused train`: train one of the paper's networks on one data set.

Choices where the paper is silent (the same for every model and data set):

- Optimiser: Adam, learning rate 1e-3 (``--lr``), no weight decay, constant schedule, so the
  accuracy curve at iteration k does not depend on the total iteration count.
- Loss: cross-entropy. Batches: a fresh seeded permutation of the training set each epoch.
- Inputs: scaled to [0, 1] and normalised per channel by the training set's mean and std.
- Augmentation: none for MNIST; CIFAR-10 and Tiny ImageNet random crops (zero padding 4)
  and horizontal flips; SVHN random crops (padding 2), no flips (digits).
- Evaluation: accuracy on the whole test set every ``--eval-every`` (100) iterations and
  at the end, as the paper's accuracy-against-iterations figures do. ``train_seconds``
  counts training steps only; ``wall_seconds`` includes evaluation and data loading.

Everything random (initialisation, batch order, augmentation, dropout) follows ``--seed``,
so a run resumed from ``--checkpoint`` continues the same batch sequence.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from . import data as data_mod
from .models import MODELS, build_model, parameter_count


def add_arguments(p: argparse.ArgumentParser, single_model: bool = True) -> None:
    if single_model:
        p.add_argument("--model", choices=MODELS, default="ms2")
    p.add_argument("--dataset", choices=data_mod.DATASETS, default="mnist5k")
    p.add_argument("--data-dir", default=None, help="folder holding mnist/cifar10/svhn/"
                   "tinyimagenet (not needed for mnist5k)")
    p.add_argument("--download", action="store_true",
                   help="let torchvision download mnist/cifar10/svhn into --data-dir")
    p.add_argument("--iters", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--backend", default="auto",
                   help="backend of the multi-scale blocks (ms1/ms2): auto, cpp, reference, ...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-limit", type=int, default=None,
                   help="evaluate on the first N test images only (default: all)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    if single_model:
        p.add_argument("--json", default=None, help="write the result here")
        p.add_argument("--checkpoint", default=None,
                       help="save model+optimizer here at every evaluation and at the end")
        p.add_argument("--resume", action="store_true",
                       help="continue from --checkpoint if it exists")


class _Progress:
    """tqdm when installed, else a plain text bar on stderr."""

    def __init__(self, total: int, start: int, desc: str, quiet: bool):
        self.total, self.n, self.desc, self.quiet = total, start, desc, quiet
        self.postfix, self.loss = "", float("nan")
        self.t0 = time.perf_counter()
        self._tqdm = None
        self._last = 0.0
        if quiet:
            return
        try:
            from tqdm import tqdm
            self._tqdm = tqdm(total=total, initial=start, desc=desc, file=sys.stderr)
        except ImportError:
            pass

    def update(self, loss: float) -> None:
        self.n += 1
        if self.quiet:
            return
        if self._tqdm is not None:
            self._tqdm.set_postfix_str(f"loss {loss:.3f} {self.postfix}", refresh=False)
            self._tqdm.update(1)
            return
        self.loss = loss
        now = time.perf_counter()
        # on a terminal: redraw at most twice a second; in a log: one line per evaluation
        if not sys.stderr.isatty() or (now - self._last < 0.5 and self.n != self.total):
            return
        self._last = now
        self._draw("\r", "")

    def _draw(self, start: str, end: str) -> None:
        frac = self.n / max(1, self.total)
        bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
        sys.stderr.write(f"{start}{self.desc} [{bar}] {self.n}/{self.total} "
                         f"{time.perf_counter() - self.t0:6.1f}s loss {self.loss:.3f} "
                         f"{self.postfix}{end}")
        sys.stderr.flush()

    def note(self, msg: str) -> None:
        self.postfix = msg
        if not self.quiet and self._tqdm is None:
            if sys.stderr.isatty():
                self._draw("\r", "")
            else:
                self._draw("", "\n")

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
        elif not self.quiet and sys.stderr.isatty():
            sys.stderr.write("\n")


def _normalise(x: torch.Tensor, d: data_mod.Data) -> torch.Tensor:
    x = x.float().div_(255.0)
    mean = torch.tensor(d.mean).view(1, -1, 1, 1)
    std = torch.tensor(d.std).view(1, -1, 1, 1)
    return (x - mean) / std


def _augment(x: torch.Tensor, d: data_mod.Data, g: torch.Generator) -> torch.Tensor:
    b, _, h, w = x.shape
    if d.crop_pad:
        p = d.crop_pad
        xp = F.pad(x, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (b,), generator=g)
        dx = torch.randint(0, 2 * p + 1, (b,), generator=g)
        rows = (dy.view(b, 1) + torch.arange(h).view(1, h))            # (b, h)
        cols = (dx.view(b, 1) + torch.arange(w).view(1, w))            # (b, w)
        bi = torch.arange(b).view(b, 1, 1)
        x = xp.permute(0, 2, 3, 1)[bi, rows.view(b, h, 1), cols.view(b, 1, w)]
        x = x.permute(0, 3, 1, 2).contiguous()
    if d.flip:
        f = torch.rand(b, generator=g) < 0.5
        x = torch.where(f.view(b, 1, 1, 1), x.flip(3), x)
    return x


def _batch_indices(n: int, batch: int, it: int, seed: int) -> torch.Tensor:
    """The indices of iteration `it`: epochs of seeded permutations, batches wrap across
    epoch boundaries. A pure function of (it, seed), so a resumed run sees the same batches."""
    start = it * batch
    out = []
    while len(out) < batch:
        epoch, pos = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        out.extend(perm[pos:pos + batch - len(out)].tolist())
    return torch.tensor(out)


@torch.no_grad()
def evaluate(model: torch.nn.Module, d: data_mod.Data, limit: Optional[int] = None,
             batch: int = 500) -> float:
    was = model.training
    model.eval()
    x, y = d.test_x, d.test_y
    if limit is not None:
        x, y = x[:limit], y[:limit]
    correct = 0
    for i in range(0, len(x), batch):
        out = model(_normalise(x[i:i + batch], d))
        correct += (out.argmax(1) == y[i:i + batch]).sum().item()
    model.train(was)
    return correct / max(1, len(x))


def train(model_name: str, dataset: str = "mnist5k", iters: int = 600, batch_size: int = 128,
          backend: str = "auto", seed: int = 0, lr: float = 1e-3, eval_every: int = 100,
          eval_limit: Optional[int] = None, data_dir: Optional[str] = None,
          download: bool = False, checkpoint: Optional[str] = None, resume: bool = False,
          json_path: Optional[str] = None, quiet: bool = False,
          data: Optional[data_mod.Data] = None, log: Callable[[str], None] = None) -> Dict:
    """Train one model; returns (and with json_path writes) the result dict."""
    log = log or (lambda s: print(s, file=sys.stderr))
    t_wall = time.perf_counter()
    d = data if data is not None else data_mod.load(dataset, data_dir, download)
    torch.manual_seed(seed)
    model = build_model(model_name, d.in_channels, d.image_size, d.num_classes, backend=backend)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    start, history, train_seconds, loss_v = 0, [], 0.0, float("nan")
    if resume and checkpoint and os.path.isfile(checkpoint):
        ck = torch.load(checkpoint, map_location="cpu", weights_only=False)
        for k, v in (("model", model_name), ("dataset", d.name), ("batch_size", batch_size),
                     ("seed", seed)):
            if ck["meta"][k] != v:
                raise ValueError(f"--resume: checkpoint {checkpoint} has {k}={ck['meta'][k]!r}, "
                                 f"this run asks for {v!r}")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        start, history, train_seconds = ck["iter"], ck["history"], ck["train_seconds"]
        torch.set_rng_state(ck["torch_rng"])
        log(f"resumed from {checkpoint} at iteration {start}")
    meta = dict(model=model_name, dataset=d.name, batch_size=batch_size, seed=seed)

    def save_checkpoint(it):
        if checkpoint:
            os.makedirs(os.path.dirname(os.path.abspath(checkpoint)), exist_ok=True)
            tmp = checkpoint + ".tmp"
            torch.save(dict(meta=meta, model=model.state_dict(), optimizer=opt.state_dict(),
                            iter=it, history=history, train_seconds=train_seconds,
                            torch_rng=torch.get_rng_state()), tmp)
            os.replace(tmp, checkpoint)

    model.train()
    bar = _Progress(iters, start, f"{model_name}/{d.name}", quiet)
    for it in range(start, iters):
        t0 = time.perf_counter()
        idx = _batch_indices(len(d.train_x), batch_size, it, seed)
        xb = d.train_x[idx]
        if d.crop_pad or d.flip:
            xb = _augment(xb, d, torch.Generator().manual_seed(seed * 7919 + it))
        xb, yb = _normalise(xb, d), d.train_y[idx]
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        train_seconds += time.perf_counter() - t0
        loss_v = loss.item()
        bar.update(loss_v)
        done = it + 1
        if done % eval_every == 0 or done == iters:
            acc = evaluate(model, d, eval_limit)
            if not history or history[-1][0] != done:
                history.append((done, acc))
            bar.note(f"test acc {100 * acc:.2f}% @ {done}")
            save_checkpoint(done)
    bar.close()
    if history and history[-1][0] == iters:
        acc = history[-1][1]
    else:
        acc = evaluate(model, d, eval_limit)
        history.append((iters, acc))
    result = dict(model=model_name, dataset=d.name, iters=iters, batch_size=batch_size,
                  backend=backend, seed=seed, lr=lr, test_accuracy=acc,
                  test_images=len(d.test_x) if eval_limit is None else min(eval_limit, len(d.test_x)),
                  train_seconds=round(train_seconds, 3),
                  wall_seconds=round(time.perf_counter() - t_wall, 3),
                  params=parameter_count(model), final_train_loss=loss_v,
                  history=[[i, a] for i, a in history], torch=torch.__version__,
                  threads=torch.get_num_threads(), machine=platform.processor() or platform.machine())
    log(f"{model_name} on {d.name}: test accuracy {100 * acc:.2f}% after {iters} iterations "
        f"(batch {batch_size}, backend {backend}), {result['params']:,} parameters, "
        f"{result['train_seconds']:.1f} s training, {result['wall_seconds']:.1f} s wall")
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)
    return result


def run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        train(args.model, args.dataset, args.iters, args.batch_size, args.backend, args.seed,
              args.lr, args.eval_every, args.eval_limit, args.data_dir, args.download,
              args.checkpoint, args.resume, args.json, args.quiet)
    except data_mod.DatasetMissingError as e:
        print(f"msfused train: {e}", file=sys.stderr)
        return 2
    return 0
