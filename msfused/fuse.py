"""msfused.fuse_model: find, with torch.fx, the sub-graphs of a model that compute the
block of SPEC section 1 from plain nn.Conv2d modules, and swap in MultiScaleSeparableBlock
modules carrying the same weights (BatchNorm after a conv folded in, in eval mode).

How it works, module by module, deepest first:
1. trace the module with torch.fx (nn layers and MultiScaleSeparableBlock are leaves);
   a module fx cannot trace (data-dependent control flow...) is left as it is, and said so;
2. match the block's pattern (msfused.fuse_patterns) at every node, largest first;
3. if one block is the module's whole forward (the usual hand-written block class), the
   module instance is replaced by the new block in its parent; otherwise the module is
   replaced by the fx GraphModule in which each matched sub-graph is one call of a new
   block, every other node and submodule untouched.
Nothing is patched on classes; the model's own instances are modified in place and the
model is returned, as torch.ao.quantization.fuse_modules, torch.compile and fx passes
return theirs (a new object only when the root module itself had to become an fx
GraphModule). What was swapped is logged (logger "msfused.fuse", INFO) and, with
report=True, returned beside the model as a FuseReport.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import List, Optional, Tuple, Union

import torch
import torch.fx as fx
from torch import nn

from .backends.registry import check_backend_name
from .fuse_norms import is_norm_leaf
from .fuse_patterns import BlockMatch, find_blocks
from .modules import MultiScaleSeparableBlock


@dataclass(frozen=True)
class Swap:
    """One swapped sub-graph: where the new block lives, its configuration, and the
    modules whose computation it took over (BatchNorms folded into the convs included)."""

    path: str
    block: str
    replaced: Tuple[str, ...]
    folded_batchnorm: Tuple[str, ...]

    def __str__(self) -> str:
        folded = f", folded {', '.join(self.folded_batchnorm)}" if self.folded_batchnorm else ""
        return f"{self.path or '<root>'}: {self.block} <- {', '.join(self.replaced)}{folded}"


_LOG = logging.getLogger(__name__)


@dataclass
class FuseReport:
    """What fuse_model did: the swaps made, and the modules that fx could not trace (with
    why) and that were therefore not searched."""

    swaps: List[Swap] = field(default_factory=list)
    untraceable: List[Tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"msfused.fuse_model: {len(self.swaps)} block(s) swapped"]
        lines += [f"  {s}" for s in self.swaps]
        lines += [f"  not traced: {p or '<root>'} ({why})" for p, why in self.untraceable]
        return "\n".join(lines)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (isinstance(m, MultiScaleSeparableBlock) or is_norm_leaf(m)
                or super().is_leaf_module(m, qualname))


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _build_block(gm: fx.GraphModule, m: BlockMatch, backend: str) -> MultiScaleSeparableBlock:
    ref = gm.get_submodule(m.dw_a.conv).weight
    blk = MultiScaleSeparableBlock(
        m.in_channels, m.n, merge=m.merge, stride=m.stride, activation=m.activation,
        residual=m.residual, bias=m.has_bias(gm), backend=backend,
        device=ref.device, dtype=ref.dtype)
    roles = {"dw_a": m.dw_a, "dw_b": m.dw_b, "dw_c": m.dw_c, "pw_a": m.pw_a, "pw_b": m.pw_b}
    if m.shortcut is not None:
        roles["shortcut"] = m.shortcut
    with torch.no_grad():
        for role, unit in roles.items():
            w, b = unit.folded(gm)
            target = getattr(blk, role)
            target.weight.copy_(w)
            if target.bias is not None:
                target.bias.copy_(b)
    blk.train(gm.get_submodule(m.dw_a.conv).training)
    return blk


def _rewrite(gm: fx.GraphModule, matches: List[BlockMatch], backend: str, prefix: str,
             swaps: List[Swap]) -> None:
    """Each match becomes one call_module of a new block; its nodes are erased."""
    taken = set(gm._modules)
    for i, m in enumerate(matches):
        name = f"msfused_block_{i}"
        while name in taken:
            name += "_"
        taken.add(name)
        gm.add_submodule(name, _build_block(gm, m, backend))
        with gm.graph.inserting_before(m.end):
            call = gm.graph.call_module(name, (m.x,))
        m.end.replace_all_uses_with(call)
        for node in reversed(m.nodes):  # consumers first
            gm.graph.erase_node(node)
        swaps.append(Swap(_join(prefix, name), m.describe(),
                          tuple(_join(prefix, t) for t in m.modules()),
                          tuple(_join(prefix, t) for t in m.batchnorms())))
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()


def _single_block(gm: fx.GraphModule) -> Optional[nn.Module]:
    """The block module if the rewritten graph is just input -> block -> output."""
    nodes = list(gm.graph.nodes)
    if len(nodes) != 3:
        return None
    ph, call, out = nodes
    if (ph.op == "placeholder" and call.op == "call_module" and out.op == "output"
            and call.args == (ph,) and out.args == (call,)):
        return gm.get_submodule(call.target)
    return None


def _replace_everywhere(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for parent in root.modules():
        for name, child in list(parent._modules.items()):
            if child is old:
                setattr(parent, name, new)


def _searchable(mod: nn.Module) -> bool:
    if isinstance(mod, MultiScaleSeparableBlock):
        return False
    convs = sum(1 for m in mod.modules() if type(m) is nn.Conv2d)
    return convs >= 5  # the block has five convs (six with a projection)


def fuse_model(model: nn.Module, backend: str = "auto", *, fold_batchnorm: bool = True,
               report: bool = False) -> Union[nn.Module, Tuple[nn.Module, FuseReport]]:
    """Swap every sub-graph of `model` that computes the multi-scale separable block from
    plain nn.Conv2d modules for a MultiScaleSeparableBlock (backend `backend`) with the
    same weights, and return the model: `model = msfused.fuse_model(model)`. With
    report=True, return `(model, FuseReport)`; the report is logged either way (logger
    "msfused.fuse", INFO).

    Matched: depthwise 3x3 (padding 1, stride 1 or 2) twice from one input, the second of
    them followed by a depthwise 3x3 at stride 1; a 1x1 conv after each branch (same
    width); torch.cat(dim=1) (short branch first) or +; an optional + of the input itself
    (stride 1, same width) or of a 1x1 projection of it; one activation (relu, relu6, silu
    as nn modules, torch.nn.functional or tensor methods, or none) after every depthwise
    conv and at the end. An eval-mode norm right after any of these convs is folded into it:
    nn.BatchNorm2d, timm's BatchNormAct2d (whose activation then counts as the one after
    the conv) and FrozenBatchNormAct2d, torchvision's FrozenBatchNorm2d
    (fold_batchnorm=False leaves such sub-graphs alone). torchvision's Conv2dNormActivation
    and timm's ConvNormAct layers are seen through. Anything that only
    looks alike (another kernel size, dilation, groups, padding, padding mode, a conv
    subclass, hooks, an intermediate used elsewhere, different activations) is left as is.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    check_backend_name(backend)
    if not isinstance(report, bool):
        raise TypeError(f"report: expected bool, got {type(report).__name__} {report!r}")
    result = FuseReport()
    root = model
    names = [n for n, _ in model.named_modules()]
    names.sort(key=lambda n: -(n.count(".") + 1 if n else 0))  # deepest first, root last
    for path in names:
        try:
            mod = root.get_submodule(path) if path else root
        except AttributeError:  # an ancestor was replaced already
            continue
        if not _searchable(mod):
            continue
        tracer = _Tracer()
        try:
            graph = tracer.trace(mod)
        except Exception as e:  # noqa: BLE001 - any tracing failure leaves the module alone
            result.untraceable.append((path, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"))
            continue
        gm = fx.GraphModule(tracer.root, graph, type(mod).__name__)
        matches = find_blocks(gm, fold_batchnorm=fold_batchnorm)
        if not matches:
            continue
        swaps: List[Swap] = []
        _rewrite(gm, matches, backend, path, swaps)
        single = _single_block(gm)
        if single is not None:  # the module *was* the block: swap the instance itself
            new = single
            swaps = [Swap(path, s.block, s.replaced, s.folded_batchnorm) for s in swaps]
        else:
            new = gm
        result.swaps.extend(swaps)
        if path:
            _replace_everywhere(root, mod, new)
        else:
            root = new
    _LOG.info("%s", result)
    return (root, result) if report else root
