"""The seed paper's networks (SPEC section 5, Wang et al. 2018, Table 1 and Fig. 3).

Skeleton, the same for all five models: U units, each followed by 2x2 max-pooling, then
FC 384, FC 192 and the classifier. U = 2 for 28x28 inputs, 3 for 32x32, 4 for 64x64, with
unit widths N = 32, 64, 128 (, 256). The models differ only in the unit:

- ``ms1`` (method 1): MultiScaleSeparableBlock(merge="concat") -> 2N channels
- ``ms2`` (method 2): MultiScaleSeparableBlock(merge="add")    -> N channels
- ``alexnet``:   3x3 convolution C -> N
- ``mobilenet``: depthwise 3x3 (C), then pointwise 1x1 C -> N
- ``googlenet``: inception module, four branches of N channels each, concatenated (4N):
  1x1; 1x1 -> 3x3; 1x1 -> 5x5; 3x3 max-pool (stride 1) -> 1x1. Every convolution in it has
  N outputs, which is what Table 2's N+N+9N+N+25N+N counts.

Choices where the paper is silent (a careful reproduction, the same for every model):

- Units use ``residual=False``. The paper's unit (Fig. 3) has no shortcut and Table 2's
  27+2N counts none; the block's residual projection would add C*C_out parameters per unit
  that no baseline has. The choice is the same on every backend.
- Activation: ReLU after every convolution (inside the block: the SPEC's act="relu",
  applied after each depthwise conv and after the merge) and after FC 384 and FC 192.
- Normalisation: none. The paper lists no batch normalisation; the TensorFlow CIFAR-10
  tutorial model whose FC 384 / FC 192 head Table 1 copies has none either.
- Dropout: 0.5 on the FC 384 and FC 192 outputs (small training sets, large FC layers).
- Initialisation: He (Kaiming-normal, fan-in, ReLU gain) for every convolution and linear
  weight, zero biases, applied by the network after construction (the block alone keeps
  nn.Conv2d's default, SPEC section 2). Measured here: with PyTorch's default
  (variance 1/(3 fan_in)) the signal shrinks ~6x per layer and the ms2 MNIST network was
  still at 47% test accuracy after 60 iterations, against 90-92% with He init.
- Convolutions keep the spatial size (padding "same", stride 1); only pooling halves it.
- Optimiser, learning rate, augmentation: see msfused/train.py.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn

from ..modules import MultiScaleSeparableBlock

MODELS = ("ms1", "ms2", "mobilenet", "alexnet", "googlenet")
UNIT_KINDS = ("googlenet", "alexnet", "mobilenet", "method1", "method2")
_MODEL_TO_KIND = {"ms1": "method1", "ms2": "method2", "mobilenet": "mobilenet",
                  "alexnet": "alexnet", "googlenet": "googlenet"}
WIDTHS = (32, 64, 128, 256)
UNITS_FOR_SIZE = {28: 2, 32: 3, 64: 4}


def unit_parameter_count(kind: str, n: int) -> int:
    """A unit's weights per input channel, counted as the paper's Table 2 counts them
    (biases and the cross-channel factor left out). At n = 32: googlenet 1216, alexnet 288,
    mobilenet 41, method1 91, method2 91."""
    if kind in _MODEL_TO_KIND:
        kind = _MODEL_TO_KIND[kind]
    n = int(n)
    if kind == "googlenet":
        return n + n + 9 * n + n + 25 * n + n
    if kind == "alexnet":
        return 9 * n
    if kind == "mobilenet":
        return n + 9
    if kind in ("method1", "method2"):
        return 27 + 2 * n
    raise ValueError(f"kind: expected one of {', '.join(UNIT_KINDS)}, got {kind!r}")


def _conv(c_in: int, c_out: int, k: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, padding=k // 2), nn.ReLU(inplace=True))


class AlexNetUnit(nn.Sequential):
    def __init__(self, c: int, n: int):
        super().__init__(nn.Conv2d(c, n, 3, padding=1), nn.ReLU(inplace=True))
        self.out_channels = n


class MobileNetUnit(nn.Sequential):
    def __init__(self, c: int, n: int):
        super().__init__(nn.Conv2d(c, c, 3, padding=1, groups=c), nn.ReLU(inplace=True),
                         nn.Conv2d(c, n, 1), nn.ReLU(inplace=True))
        self.out_channels = n


class InceptionUnit(nn.Module):
    def __init__(self, c: int, n: int):
        super().__init__()
        self.b1 = _conv(c, n, 1)
        self.b3 = nn.Sequential(_conv(c, n, 1), _conv(n, n, 3))
        self.b5 = nn.Sequential(_conv(c, n, 1), _conv(n, n, 5))
        self.bp = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), _conv(c, n, 1))
        self.out_channels = 4 * n

    def forward(self, x):
        return torch.cat([self.b1(x), self.b3(x), self.b5(x), self.bp(x)], dim=1)


def make_unit(model: str, c: int, n: int, backend: str = "auto") -> nn.Module:
    if model in ("ms1", "ms2"):
        return MultiScaleSeparableBlock(c, n, merge="concat" if model == "ms1" else "add",
                                        residual=False, activation="relu", backend=backend)
    if model == "alexnet":
        return AlexNetUnit(c, n)
    if model == "mobilenet":
        return MobileNetUnit(c, n)
    if model == "googlenet":
        return InceptionUnit(c, n)
    raise ValueError(f"model: expected one of {', '.join(MODELS)}, got {model!r}")


class PaperNet(nn.Module):
    """units (each + 2x2 max-pool) -> FC 384 -> FC 192 -> classifier."""

    def __init__(self, model: str, in_channels: int = 1, image_size: int = 28,
                 num_classes: int = 10, backend: str = "auto", dropout: float = 0.5,
                 widths: Sequence[int] | None = None):
        super().__init__()
        if image_size not in UNITS_FOR_SIZE and widths is None:
            raise ValueError(f"image_size: expected one of {sorted(UNITS_FOR_SIZE)} "
                             f"(or give widths), got {image_size}")
        if widths is None:
            widths = WIDTHS[:UNITS_FOR_SIZE[image_size]]
        self.model, self.backend = model, backend
        layers: List[nn.Module] = []
        c, s = in_channels, image_size
        for n in widths:
            unit = make_unit(model, c, n, backend)
            layers += [unit, nn.MaxPool2d(2)]
            c, s = unit.out_channels, s // 2
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c * s * s, 384), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(384, 192), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(192, num_classes))

        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.classifier(self.features(x))


def build_model(model: str, in_channels: int, image_size: int, num_classes: int,
                backend: str = "auto", **kw) -> PaperNet:
    return PaperNet(model, in_channels, image_size, num_classes, backend=backend, **kw)


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# (in_channels, image_size, num_classes) of each data set's network
INPUT_SHAPES: Dict[str, Tuple[int, int, int]] = {
    "mnist": (1, 28, 10), "cifar10": (3, 32, 10), "svhn": (3, 32, 10),
    "tinyimagenet": (3, 64, 200)}


def network_parameter_table() -> List[Tuple[str, str, int, int]]:
    """(input, model, whole-network parameters, of which in the units) for every model on
    every input size."""
    rows = []
    for name, (c, s, k) in INPUT_SHAPES.items():
        for m in MODELS:
            net = build_model(m, c, s, k, backend="reference")
            rows.append((f"{name} {s}x{s}x{c}", m, parameter_count(net),
                         parameter_count(net.features)))
    return rows


def print_parameter_counts(file=None) -> None:
    """Table 2 (per input channel, N = 32) and each whole network's real parameter count."""
    print("Table 2: unit parameters per input channel, N = 32", file=file)
    for kind in UNIT_KINDS:
        print(f"  {kind:<10} {unit_parameter_count(kind, 32):>6}", file=file)
    print(f"{'network':<24} {'model':<10} {'params':>12} {'in units':>12}", file=file)
    for inp, m, total, units in network_parameter_table():
        print(f"{inp:<24} {m:<10} {total:>12,} {units:>12,}", file=file)


if __name__ == "__main__":
    print_parameter_counts()
