"""Derive a permutation spec from a module's traced graph (``torch.fx``).

Every tensor in the graph that carries permutable channels is tagged with a *channel space*
and the axis holding it. A Linear / Conv / Embedding starts a new space at its output (its
weight rows and bias are producers) and consumes its input's space (weight columns);
BatchNorm, LayerNorm, GroupNorm, depthwise convs, elementwise functions, pooling and
flatten-to-1×1 keep the space; an elementwise op on two tagged tensors (a residual add)
joins their spaces into one. Spaces that reach the model's inputs or outputs, or an
operation not understood, are frozen (left in place, weights averaged). Attention modules
with ``query`` / ``key`` / ``value`` Linears and ``num_attention_heads`` (Hugging Face BERT-
style) are handled whole: a Q·K group and a V·O group, head-structured and linked.

A module with parameters that no rule covers raises ``NotImplementedError`` naming it;
declare the groups by hand with :meth:`PermSpec.declare` instead.

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> spec = derive_spec(net, torch.randn(2, 3))
    >>> [(m.param, m.axis, m.role) for m in spec.groups[0].members]
    [('0.weight', 0, 'out'), ('0.bias', 0, 'out'), ('2.weight', 1, 'in')]
    >>> spec.groups[0].probes
    (Probe(module='2', site='input', axis=-1, block=(0, 1)),)
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn import functional as F

from drm_lightning.alignment.spec import Member, PermGroup, PermSpec, Probe

_ELEMENTWISE_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.LeakyReLU,
    nn.ELU,
    nn.Softplus,
    nn.Mish,
    nn.Hardswish,
    nn.Hardtanh,
    nn.Identity,
    nn.modules.dropout._DropoutNd,
)
_POOLS = (
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
)
_ELEMENTWISE_FUNCTIONS = {
    F.relu,
    torch.relu,
    F.gelu,
    torch._C._nn.gelu,
    F.silu,
    torch.tanh,
    torch.sigmoid,
    F.dropout,
    F.leaky_relu,
    F.elu,
    F.softplus,
    F.mish,
    F.hardswish,
    F.relu6,
}
_ELEMENTWISE_METHODS = {
    "relu",
    "sigmoid",
    "tanh",
    "contiguous",
    "clone",
    "float",
    "double",
    "to",
    "detach",
}
_BINARY = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    torch.add,
    torch.sub,
    torch.mul,
}
_BINARY_METHODS = {"add", "sub", "mul", "div"}


def is_attention(module: nn.Module) -> bool:
    """A BERT-style attention: ``query``, ``key``, ``value`` Linears and ``num_attention_heads``."""
    return all(
        isinstance(getattr(module, n, None), nn.Linear) for n in ("query", "key", "value")
    ) and hasattr(module, "num_attention_heads")


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return is_attention(m) or super().is_leaf_module(m, qualname)


@dataclass
class _Space:
    size: int
    members: list[Member] = field(default_factory=list)
    inputs: list[Probe] = field(default_factory=list)
    outputs: list[Probe] = field(default_factory=list)
    probes: list[Probe] = field(default_factory=list)
    num_groups: int = 1
    link: str | None = None
    frozen: str | None = None
    name: str = ""


@dataclass(frozen=True)
class _Val:
    space: int
    axis: int  # absolute channel axis of the node's output


class _Deriver:
    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modules = dict(model.named_modules())
        self.spaces: list[_Space] = []
        self.parent: list[int] = []
        self.vals: dict[fx.Node, Any] = {}

    # union-find over channel spaces
    def new(self, size: int, name: str) -> int:
        self.spaces.append(_Space(size, name=name))
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int) -> int:
        a, b = sorted((self.find(a), self.find(b)))  # the first writer's space stays the root
        if a == b:
            return a
        sa, sb = self.spaces[a], self.spaces[b]
        if sa.size != sb.size:
            self.freeze(a, f"joined with a space of {sb.size} channels")
            self.freeze(b, f"joined with a space of {sa.size} channels")
        self.parent[b] = a
        sa.members += sb.members
        sa.inputs += sb.inputs
        sa.outputs += sb.outputs
        sa.probes += sb.probes
        sa.num_groups = max(sa.num_groups, sb.num_groups)
        sa.frozen = sa.frozen or sb.frozen
        sa.link = sa.link or sb.link
        return a

    def space(self, v: _Val) -> _Space:
        return self.spaces[self.find(v.space)]

    def freeze(self, s: int, why: str) -> None:
        sp = self.spaces[self.find(s)]
        sp.frozen = sp.frozen or why

    def freeze_args(self, node: fx.Node, why: str) -> None:
        for a in node.all_input_nodes:
            v = self.vals.get(a)
            if isinstance(v, _Val):
                self.freeze(v.space, why)
            elif isinstance(v, tuple):
                for item in v:
                    if isinstance(item, _Val):
                        self.freeze(item.space, why)

    @staticmethod
    def shape(node: Any) -> tuple[int, ...] | None:
        meta = getattr(node, "meta", {}).get("tensor_meta") if isinstance(node, fx.Node) else None
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def val(self, arg: Any) -> Any:
        return self.vals.get(arg) if isinstance(arg, fx.Node) else None

    # module rules
    def module(self, node: fx.Node) -> Any:
        name = str(node.target)
        mod = self.modules[name]
        x = self.val(node.args[0]) if node.args else None
        shape = self.shape(node)
        ndim = len(shape) if shape else 0
        if is_attention(mod):
            return self.attention(name, mod, x)
        if isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd)):
            is_linear = isinstance(mod, nn.Linear)
            axis_in = -1 if is_linear else 1
            if not is_linear and mod.groups != 1:
                if x is not None and mod.groups == mod.in_channels == mod.out_channels:
                    self.add(
                        x,
                        Member(f"{name}.weight", 0),
                        Member(f"{name}.bias", 0) if mod.bias is not None else None,
                    )
                    self.space(x).outputs.append(Probe(name, "output", 1))
                    return x
                self.freeze_args(node, f"grouped conv {name}")
                return None
            if x is not None:
                xs = self.shape(node.args[0])
                if xs is None or x.axis % len(xs) != axis_in % len(xs):
                    self.freeze(x.space, f"{name} does not read the channel axis")
                else:
                    self.add(x, Member(f"{name}.weight", 1, "in"))
                    self.space(x).inputs.append(Probe(name, "input", axis_in))
            s = self.new(mod.weight.shape[0], name)
            v = _Val(s, ndim - 1 if is_linear else 1)
            self.add(
                v,
                Member(f"{name}.weight", 0),
                Member(f"{name}.bias", 0) if mod.bias is not None else None,
            )
            self.space(v).outputs.append(Probe(name, "output", axis_in))
            return v
        if isinstance(mod, nn.Embedding):
            s = self.new(mod.embedding_dim, name)
            v = _Val(s, ndim - 1)
            self.add(v, Member(f"{name}.weight", 1))
            self.space(v).outputs.append(Probe(name, "output", -1))
            return v
        if isinstance(mod, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)):
            if x is None:
                return None
            if isinstance(mod, nn.LayerNorm) and (
                len(mod.normalized_shape) != 1 or x.axis != ndim - 1
            ):
                self.freeze(x.space, f"LayerNorm {name} over more than the channel axis")
                return None
            if not isinstance(mod, nn.LayerNorm) and x.axis != 1:
                self.freeze(x.space, f"{name} expects channels on axis 1")
                return None
            params = dict(mod.named_parameters(recurse=False))
            self.add(x, *(Member(f"{name}.{p}", 0) for p in params))
            if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.track_running_stats:
                self.add(
                    x,
                    Member(f"{name}.running_mean", 0, ignore=True),
                    Member(f"{name}.running_var", 0, ignore=True),
                )
            if isinstance(mod, nn.GroupNorm):
                self.space(x).num_groups = max(self.space(x).num_groups, mod.num_groups)
            self.space(x).inputs.append(
                Probe(name, "input", x.axis if isinstance(mod, nn.LayerNorm) else 1)
            )
            return x
        if isinstance(mod, _ELEMENTWISE_MODULES):
            return x
        if isinstance(mod, _POOLS):
            if x is not None and x.axis == 1:
                self.space(x).inputs.append(Probe(name, "input", 1))
                return x
            self.freeze_args(node, f"pooling {name}")
            return None
        if isinstance(mod, nn.Flatten):
            return self.flatten(node, x, mod.start_dim)
        if any(True for _ in mod.parameters(recurse=False)) or any(
            True for _ in mod.buffers(recurse=False)
        ):
            raise NotImplementedError(
                f"cannot derive a permutation spec: module {name!r} ({type(mod).__name__}) is not "
                "supported. Declare the groups by hand, e.g. PermSpec.declare({'hidden': {'out': "
                "['fc1.weight', 'fc1.bias'], 'in': ['fc2.weight']}}), and pass spec=..."
            )
        self.freeze_args(node, f"module {name} ({type(mod).__name__})")
        return None

    def attention(self, name: str, mod: nn.Module, x: _Val | None) -> tuple[Any, ...]:
        heads = int(mod.num_attention_heads)
        if x is not None:
            for p in ("query", "key", "value"):
                self.add(x, Member(f"{name}.{p}.weight", 1, "in"))
            self.space(x).inputs.append(Probe(f"{name}.query", "input", -1))
        width = mod.query.out_features
        qk = self.new(width, f"{name}.qk")
        sp = self.spaces[qk]
        sp.num_groups, sp.link = heads, name
        for p in ("query", "key"):
            bias = Member(f"{name}.{p}.bias", 0) if getattr(mod, p).bias is not None else None
            self.add(_Val(qk, -1), Member(f"{name}.{p}.weight", 0), bias)
            sp.probes.append(Probe(f"{name}.{p}", "output", -1))
        vo = self.new(mod.value.out_features, f"{name}.vo")
        self.spaces[vo].num_groups, self.spaces[vo].link = heads, name
        bias = Member(f"{name}.value.bias", 0) if mod.value.bias is not None else None
        self.add(_Val(vo, -1), Member(f"{name}.value.weight", 0), bias)
        self.spaces[vo].outputs.append(Probe(f"{name}.value", "output", -1))
        return (_Val(vo, -1), None)

    def add(self, v: _Val, *members: Member | None) -> None:
        self.space(v).members.extend(m for m in members if m is not None)

    def flatten(self, node: fx.Node, x: _Val | None, start: int) -> Any:
        xs = self.shape(node.args[0]) if node.args else None
        if x is None or xs is None:
            return None
        start %= len(xs)
        tail = 1
        for d in xs[x.axis + 1 :]:
            tail *= d
        if x.axis == start and tail == 1:
            return _Val(x.space, start)
        if x.axis < start:
            return x
        self.freeze(x.space, "flattened with other axes")
        return None

    # function / method rules
    def function(self, node: fx.Node) -> Any:
        target = node.target
        args = node.args
        first = self.val(args[0]) if args else None
        if target is operator.getitem:
            if isinstance(first, tuple):
                return first[args[1]] if isinstance(args[1], int) and args[1] < len(first) else None
            if isinstance(first, _Val):
                return self.getitem(node, first, args[1])
            return None
        method = node.op == "call_method"
        if (not method and target in _ELEMENTWISE_FUNCTIONS) or (
            method and target in _ELEMENTWISE_METHODS
        ):
            return first
        if (not method and target in _BINARY) or (method and target in _BINARY_METHODS):
            return self.binary(node)
        if (not method and target is torch.flatten) or (method and target == "flatten"):
            start = (
                args[1] if len(args) > 1 else node.kwargs.get("start_dim", 0 if not method else 0)
            )
            return self.flatten(node, first, int(start))
        if (not method and target is torch.mean) or (method and target == "mean"):
            dims = args[1] if len(args) > 1 else node.kwargs.get("dim")
            keep = node.kwargs.get("keepdim", args[2] if len(args) > 2 else False)
            if isinstance(first, _Val) and dims is not None:
                xs = self.shape(args[0]) or ()
                dims = [d % len(xs) for d in (dims if isinstance(dims, (tuple, list)) else [dims])]
                if first.axis not in dims:
                    return _Val(
                        first.space,
                        first.axis if keep else first.axis - sum(d < first.axis for d in dims),
                    )
        self.freeze_args(node, f"function {getattr(target, '__name__', target)}")
        return None

    def getitem(self, node: fx.Node, x: _Val, index: Any) -> Any:
        xs, out = self.shape(node.args[0]), self.shape(node)
        idx = index if isinstance(index, tuple) else (index,)
        if xs and out and x.axis == len(xs) - 1 and Ellipsis not in idx and None not in idx:
            if len(idx) < len(xs) or idx[len(xs) - 1] == slice(None):
                return _Val(x.space, len(out) - 1)
        self.freeze(x.space, "indexed on the channel axis")
        return None

    def binary(self, node: fx.Node) -> Any:
        out = self.shape(node)
        tensors = [a for a in node.args[:2] if isinstance(a, fx.Node)]
        vals = [self.val(a) for a in tensors]
        tagged = [v for v in vals if isinstance(v, _Val)]
        if not tagged:
            return None
        if out is None:
            self.freeze_args(node, "binary op without shape")
            return None
        rel = {
            len(self.shape(a) or ()) - v.axis for a, v in zip(tensors, vals) if isinstance(v, _Val)
        }
        if len(rel) != 1:
            self.freeze_args(node, "binary op on different channel axes")
            return None
        res = _Val(tagged[0].space, len(out) - rel.pop())
        for v in tagged[1:]:
            res = _Val(self.union(res.space, v.space), res.axis)
        for a, v in zip(tensors, vals):
            if isinstance(v, _Val):
                continue
            shp = self.shape(a) or ()
            k = len(shp) - (len(out) - res.axis)
            if a.op == "get_attr" and 0 <= k < len(shp) and shp[k] == self.space(res).size:
                self.add(res, Member(str(a.target), k))
            elif 0 <= k < len(shp) and shp[k] != 1:
                self.freeze(res.space, f"{node.name}: multiplied by an untracked tensor")
        return res

    def run(self, graph: fx.Graph) -> PermSpec:
        for node in graph.nodes:
            if node.op == "call_module":
                self.vals[node] = self.module(node)
            elif node.op in ("call_function", "call_method"):
                self.vals[node] = self.function(node)
            elif node.op == "output":
                self.freeze_args(node, "model output")
        return self.spec()

    def spec(self) -> PermSpec:
        groups, notes = [], []
        for i, sp in enumerate(self.spaces):
            if self.find(i) != i or not sp.members:
                continue
            if sp.frozen:
                notes.append(f"{sp.name}: not permuted ({sp.frozen})")
                continue
            probes = sp.probes or sp.inputs[-1:] or sp.outputs[-1:]
            groups.append(
                PermGroup(sp.name, tuple(sp.members), tuple(probes), sp.num_groups, sp.link)
            )
        return PermSpec(tuple(groups), tuple(notes))


def derive_spec(model: nn.Module, *example_inputs: Any) -> PermSpec:
    """Trace ``model`` on ``example_inputs`` and derive its permutation groups.

    Group names are the module that starts each channel space (``fc1``, ``layer1.0.conv1``;
    a residual stream is named after its first writer). ``spec.notes`` lists the spaces left
    frozen and why.

    Raises:
        NotImplementedError: a module with parameters that no rule covers (named, with how to
            declare a spec by hand), or a graph that ``torch.fx`` cannot trace.
    """
    try:
        graph = _Tracer().trace(model)
    except Exception as err:  # fx raises many types for untraceable control flow
        raise NotImplementedError(
            f"torch.fx could not trace {type(model).__name__} ({type(err).__name__}: {err}); "
            "declare the groups by hand with PermSpec.declare({...}) and pass spec=..."
        ) from err
    gm = fx.GraphModule(model, graph)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    finally:
        model.train(was_training)
    return _Deriver(model).run(gm.graph)
