"""The block of SPEC section 1 as a pattern over a torch.fx graph of nn.Conv2d modules.

find_blocks(gm) returns every place where a graph computes

    a  = act(dw_a(x))          dw_a, dw_b: depthwise 3x3, padding 1, stride s
    b  = act(dw_c(act(dw_b(x))))   dw_c: depthwise 3x3, padding 1, stride 1
    m  = cat([pw_a(a), pw_b(b)], dim=1)  or  pw_a(a) + pw_b(b)     (1x1 convs, C -> N)
    y  = act(m + x)  |  act(m + shortcut(x))  |  act(m)

where each conv may be followed by an eval-mode norm (folded; msfused.fuse_norms lists the
spellings, some of which apply the activation themselves), `act` is one of relu / relu6 /
silu (the same everywhere) or absent, and every intermediate value is used by the pattern
only. Matching is exact about what changes the math: kernel size,
padding, dilation, groups, padding mode, the conv's class (a subclass may override
forward) and hooks (a fused block would skip them); anything else is left alone.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx as fx
from torch import nn

from .activations import TABLE as ACTIVATION_TABLE
from .config import needs_projection
from .fuse_norms import is_norm_leaf, norm_info

_ADD_FUNCS = (operator.add, torch.add)
_CAT_FUNCS = (torch.cat, torch.concat, torch.concatenate)


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)


def _module(gm: fx.GraphModule, node: fx.Node) -> Optional[nn.Module]:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _only_input(node: fx.Node) -> Optional[fx.Node]:
    """The node's one tensor input, when it has exactly one and nothing else is a node."""
    if not node.args or not isinstance(node.args[0], fx.Node) or len(node.all_input_nodes) != 1:
        return None
    return node.args[0]


def _arg(node: fx.Node, i: int, name: str, default):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def activation_of(gm: fx.GraphModule, node: fx.Node) -> Optional[str]:
    """The name of the activation the node applies (as an nn module, a torch.nn.functional
    or torch function, or a Tensor method: the spellings of msfused.activations' table),
    else None."""
    if _only_input(node) is None:
        return None
    for act in ACTIVATION_TABLE:
        if node.op == "call_module":
            m = _module(gm, node)
            if type(m) in act.modules and not _has_hooks(m) and act.module_check(m):
                return act.name
        elif node.op == "call_function" and node.target in act.functions:
            check = act.functions[node.target]
            if check is None or check(tuple(node.args), dict(node.kwargs)):
                return act.name
        elif node.op == "call_method" and node.target in act.methods:
            return act.name
    return None


def _is_add(node: fx.Node) -> Optional[Tuple[fx.Node, fx.Node]]:
    ok = ((node.op == "call_function" and node.target in _ADD_FUNCS)
          or (node.op == "call_method" and node.target == "add"))
    if not ok or len(node.args) != 2 or node.kwargs:
        return None
    u, v = node.args
    if isinstance(u, fx.Node) and isinstance(v, fx.Node):
        return u, v
    return None


def _is_cat(node: fx.Node) -> Optional[Tuple[fx.Node, fx.Node]]:
    if node.op != "call_function" or node.target not in _CAT_FUNCS:
        return None
    parts = _arg(node, 0, "tensors", None)
    dim = _arg(node, 1, "dim", 0)
    if not isinstance(parts, (list, tuple)) or len(parts) != 2 or dim not in (1, -3):
        return None
    if not all(isinstance(p, fx.Node) for p in parts):
        return None
    return parts[0], parts[1]


# ---- convolutions -------------------------------------------------------------------

@dataclass
class ConvUnit:
    """One conv call, with the eval-mode norm that follows it if any (msfused.fuse_norms),
    and the activation that norm applies itself (timm's BatchNormAct2d), if any."""

    conv: str
    bn: Optional[str]
    nodes: Tuple[fx.Node, ...]
    input: fx.Node
    act_inside: str = "none"

    def folded(self, gm: fx.GraphModule) -> Tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of conv followed by the norm, computed in float64, in the conv's
        dtype."""
        conv = gm.get_submodule(self.conv)
        w = conv.weight.detach().double()
        b = (conv.bias.detach().double() if conv.bias is not None
             else torch.zeros(w.shape[0], dtype=torch.float64, device=w.device))
        if self.bn is not None:
            info = norm_info(gm.get_submodule(self.bn))
            scale, shift = info.scale.to(w.device), info.shift.to(w.device)
            w = w * scale.view(-1, 1, 1, 1)
            b = b * scale + shift
        return w.to(conv.weight.dtype), b.to(conv.weight.dtype)


def _plain_conv(gm: fx.GraphModule, node: fx.Node) -> Optional[nn.Conv2d]:
    m = _module(gm, node)
    if type(m) is not nn.Conv2d or _has_hooks(m) or node.kwargs or len(node.args) != 1:
        return None
    if m.padding_mode != "zeros" or tuple(m.dilation) != (1, 1):
        return None
    return m


def _is_norm(m: Optional[nn.Module]) -> bool:
    return m is not None and (type(m) is nn.BatchNorm2d or is_norm_leaf(m))


def _conv_unit(gm: fx.GraphModule, node: fx.Node, fold_bn: bool) -> Optional[ConvUnit]:
    m = _module(gm, node)
    if _is_norm(m):
        info = norm_info(m) if fold_bn else None
        if info is None:
            return None
        inner = _only_input(node)
        if inner is None or node.kwargs or len(node.args) != 1:
            return None
        conv = _plain_conv(gm, inner)
        if conv is None or conv.out_channels != info.num_features:
            return None
        return ConvUnit(inner.target, node.target, (inner, node), inner.args[0],
                        info.activation)
    if _plain_conv(gm, node) is None or not isinstance(node.args[0], fx.Node):
        return None
    return ConvUnit(node.target, None, (node,), node.args[0])


def _stride(conv: nn.Conv2d) -> Optional[int]:
    s = tuple(conv.stride)
    return s[0] if s[0] == s[1] and s[0] in (1, 2) else None


def _is_depthwise3(conv: nn.Conv2d) -> bool:
    c = conv.in_channels
    if tuple(conv.kernel_size) != (3, 3) or conv.groups != c or conv.out_channels != c:
        return False
    if conv.padding == "same":
        return tuple(conv.stride) == (1, 1)
    return tuple(conv.padding) == (1, 1)


def _is_pointwise(conv: nn.Conv2d) -> bool:
    if tuple(conv.kernel_size) != (1, 1) or conv.groups != 1:
        return False
    return conv.padding in ("same", "valid") or tuple(conv.padding) == (0, 0)


# ---- the block ------------------------------------------------------------------------

@dataclass
class BlockMatch:
    x: fx.Node
    end: fx.Node
    nodes: List[fx.Node]  # every node the block replaces, in graph order (end last)
    dw_a: ConvUnit
    dw_b: ConvUnit
    dw_c: ConvUnit
    pw_a: ConvUnit
    pw_b: ConvUnit
    shortcut: Optional[ConvUnit]
    merge: str
    stride: int
    activation: str
    residual: bool
    in_channels: int
    n: int

    def units(self) -> List[ConvUnit]:
        u = [self.dw_a, self.dw_b, self.dw_c, self.pw_a, self.pw_b]
        return u + ([self.shortcut] if self.shortcut is not None else [])

    def has_bias(self, gm: fx.GraphModule) -> bool:
        return any(u.bn is not None or gm.get_submodule(u.conv).bias is not None
                   for u in self.units())

    def modules(self) -> List[str]:
        """The modules whose calls the block replaces, each once (a shared activation
        module is called several times)."""
        return list(dict.fromkeys(n.target for n in self.nodes if n.op == "call_module"))

    def batchnorms(self) -> List[str]:
        return [u.bn for u in self.units() if u.bn is not None]

    def describe(self) -> str:
        return (f"MultiScaleSeparableBlock({self.in_channels}, n={self.n}, merge={self.merge!r}, "
                f"stride={self.stride}, activation={self.activation!r}, "
                f"residual={self.residual})")


class _Matcher:
    def __init__(self, gm: fx.GraphModule, fold_bn: bool):
        self.gm, self.fold_bn = gm, fold_bn

    def conv(self, node, check, act_inside: str = "none") -> Optional[ConvUnit]:
        """The conv unit ending at node, if its conv passes check and its norm applies
        act_inside itself ("none": no activation inside)."""
        u = _conv_unit(self.gm, node, self.fold_bn)
        if u is None or u.act_inside != act_inside or not check(self.gm.get_submodule(u.conv)):
            return None
        return u

    def activated(self, node, act) -> Optional[Tuple[fx.Node, List[fx.Node], str]]:
        """node = act(pre): (pre, [the activation node], "none") for a separate activation;
        (node, [], act) when node is a norm that applies act itself (then pre is that norm's
        conv unit); (node, [], "none") for act none."""
        if act == "none":
            return node, [], "none"
        if activation_of(self.gm, node) == act:
            return node.args[0], [node], "none"
        m = _module(self.gm, node)
        if _is_norm(m) and self.fold_bn:
            info = norm_info(m)
            if info is not None and info.activation == act:
                return node, [], act
        return None

    def branch_a(self, pa: fx.Node, act: str):
        pw = self.conv(pa, _is_pointwise)
        if pw is None or _stride(self.gm.get_submodule(pw.conv)) != 1:
            return None
        r = self.activated(pw.input, act)
        if r is None:
            return None
        dw = self.conv(r[0], _is_depthwise3, r[2])
        if dw is None:
            return None
        return dw, pw, [*dw.nodes, *r[1], *pw.nodes]

    def branch_b(self, pb: fx.Node, act: str):
        pw = self.conv(pb, _is_pointwise)
        if pw is None or _stride(self.gm.get_submodule(pw.conv)) != 1:
            return None
        r2 = self.activated(pw.input, act)
        if r2 is None:
            return None
        dc = self.conv(r2[0], _is_depthwise3, r2[2])
        if dc is None or _stride(self.gm.get_submodule(dc.conv)) != 1:
            return None
        r1 = self.activated(dc.input, act)
        if r1 is None:
            return None
        db = self.conv(r1[0], _is_depthwise3, r1[2])
        if db is None:
            return None
        return db, dc, pw, [*db.nodes, *r1[1], *dc.nodes, *r2[1], *pw.nodes]

    def merged(self, node: fx.Node, act: str):
        for merge, parts in (("concat", _is_cat(node)), ("add", _is_add(node))):
            if parts is None:
                continue
            orders = [parts] if merge == "concat" else [parts, parts[::-1]]
            for pa, pb in orders:
                a = self.branch_a(pa, act)
                b = self.branch_b(pb, act) if a is not None else None
                if b is None:
                    continue
                dw_a, pw_a, na = a
                dw_b, dw_c, pw_b, nb = b
                if dw_a.input is not dw_b.input:
                    continue
                g = self.gm.get_submodule
                c = g(dw_a.conv).in_channels
                s = _stride(g(dw_a.conv))
                n = g(pw_a.conv).out_channels
                if (s is None or _stride(g(dw_b.conv)) != s or g(dw_b.conv).in_channels != c
                        or g(dw_c.conv).in_channels != c or g(pw_a.conv).in_channels != c
                        or g(pw_b.conv).in_channels != c or g(pw_b.conv).out_channels != n):
                    continue
                return dict(x=dw_a.input, dw_a=dw_a, dw_b=dw_b, dw_c=dw_c, pw_a=pw_a,
                            pw_b=pw_b, merge=merge, stride=s, in_channels=c, n=n,
                            nodes=[*na, *nb, node])
        return None

    def at(self, end: fx.Node) -> Optional[BlockMatch]:
        cands = []
        act = activation_of(self.gm, end)
        if act is not None:
            cands.append((act, end.args[0], [end]))
        cands.append(("none", end, []))
        for act, inner, act_nodes in cands:
            for residual in (True, False):
                m = self.with_residual(inner, act) if residual else self.merged(inner, act)
                if m is None:
                    continue
                if not residual:
                    m.update(shortcut=None)
                m["nodes"] = m["nodes"] + act_nodes
                match = BlockMatch(end=end, activation=act, residual=residual, **m)
                if self.valid(match):
                    return match
        return None

    def with_residual(self, node: fx.Node, act: str):
        parts = _is_add(node)
        if parts is None:
            return None
        for m_node, s_node in (parts, parts[::-1]):
            m = self.merged(m_node, act)
            if m is None:
                continue
            c, n, s, x = m["in_channels"], m["n"], m["stride"], m["x"]
            c_out = 2 * n if m["merge"] == "concat" else n
            if s_node is x:
                if needs_projection(c, c_out, s):
                    continue
                m.update(shortcut=None, nodes=m["nodes"] + [node])
                return m
            sc = self.conv(s_node, _is_pointwise)
            if sc is None or sc.input is not x or not needs_projection(c, c_out, s):
                continue
            conv = self.gm.get_submodule(sc.conv)
            if _stride(conv) != s or conv.in_channels != c or conv.out_channels != c_out:
                continue
            m.update(shortcut=sc, nodes=m["nodes"] + list(sc.nodes) + [node])
            return m
        return None

    def valid(self, m: BlockMatch) -> bool:
        # every value inside the block is used by the block only
        inside = set(m.nodes)
        for node in m.nodes:
            if node is not m.end and any(u not in inside for u in node.users):
                return False
        # each conv / BatchNorm called once in this graph (a shared conv would be untied;
        # a shared activation module, one nn.ReLU called everywhere, is fine)
        targets = [n.target for n in self.gm.graph.nodes if n.op == "call_module"]
        owned = [u.conv for u in m.units()] + m.batchnorms()
        if any(targets.count(t) != 1 for t in owned):
            return False
        params = [self.gm.get_submodule(u.conv).weight for u in m.units()]
        return len({(p.dtype, p.device) for p in params}) == 1


def find_blocks(gm: fx.GraphModule, fold_batchnorm: bool = True) -> List[BlockMatch]:
    """Every non-overlapping block in gm's graph, outermost first (from the graph's end)."""
    matcher = _Matcher(gm, fold_batchnorm)
    order: Dict[fx.Node, int] = {n: i for i, n in enumerate(gm.graph.nodes)}
    used: set = set()
    found = []
    for end in reversed(list(gm.graph.nodes)):
        if end in used or end.op not in ("call_function", "call_method", "call_module"):
            continue
        m = matcher.at(end)
        if m is None or used.intersection(m.nodes):
            continue
        m.nodes = sorted(set(m.nodes), key=order.__getitem__)
        used.update(m.nodes)
        found.append(m)
    return found
