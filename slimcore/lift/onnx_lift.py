"""The core of the ONNX lifter: how ONNX values are represented while a graph is rebuilt in fx.

An ONNX graph mixes three kinds of values, and keeping them apart is what lets the lifted model follow
pruned widths and any batch size:

* tensors computed from the input: fx nodes (calls of ``torch.ops.aten`` overload packets);
* constants (initializers, ``Constant`` nodes, and anything computed from constants only): :class:`Const`,
  folded at import time by running the same aten op on them, and turned into buffers (named after the
  ONNX initializer) only where a run-time op consumes them;
* sizes (``Shape`` and the Gather/Concat/Unsqueeze/Cast/arithmetic chains exporters build on it):
  :class:`Dims`, a short list whose items are ints or fx nodes of ``aten.sym_size`` and ``operator``
  arithmetic. A Reshape fed by such a chain gets live sizes instead of the example's numbers.

Every op is also run eagerly on an example while the graph is built, so converters can read concrete
shapes (ranks, spatial sizes for ``auto_pad``) and :mod:`.reshapes` can compare reshape shapes; those
example values never become constants in the graph unless an op needs a static spatial geometry.
"""

from __future__ import annotations

import keyword
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import onnx
import torch
import torch.fx as fx
from onnx import helper, numpy_helper
from torch import nn

from ..errors import UnsupportedModel
from .modularize import CONSTANTS, constant_path

aten = torch.ops.aten
# Default-domain opsets whose op versions the converters were checked against. Versions 22-25 of the ops
# here only add element types (Cast-24 also changes float8 saturation); Range-27 adds stash_type (16-bit
# floats only), Mod-28 allows floats with fmod=0 (A - floor(A/B)*B: aten.remainder), Cast-28 adds types.
MIN_OPSET, MAX_OPSET = 11, 28
DTYPES = {1: torch.float32, 2: torch.uint8, 3: torch.int8, 5: torch.int16, 6: torch.int32, 7: torch.int64,
          9: torch.bool, 10: torch.float16, 11: torch.float64, 16: torch.bfloat16}
_RESERVED = set(dir(fx.GraphModule))


@dataclass(eq=False)
class Const:
    """A tensor known at import time; ``name`` is the ONNX initializer it came from (buffer naming)."""

    t: torch.Tensor
    name: str | None = None


@dataclass(eq=False)
class Dims:
    """A 0-D/1-D integer (or float) tensor of sizes whose items are ints or fx nodes computing them.

    ``shape`` is set when exporters rearrange sizes as a matrix (``F.pad``'s pads go through
    Reshape(-1, 2), a reversing Slice and a Transpose); items are then in row-major order, and only the
    converters in :data:`SHAPED_DIMS_OPS` see such a value (others get it as a tensor).
    """

    items: list[Any]
    scalar: bool = False
    floating: bool = False
    shape: tuple[int, ...] | None = None


# Converters that handle a Dims with a ``shape`` (a rearrangement of items, or a cast of each).
SHAPED_DIMS_OPS = {"Reshape", "Transpose", "Slice", "Cast", "Identity"}


Value = fx.Node | Const | Dims | None
Converter = Callable[["Lifter", onnx.NodeProto, list[Any], dict[str, Any], int], Any]
OPS: dict[str, Converter] = {}


def op(*names: str) -> Callable[[Converter], Converter]:
    """Register a converter for ONNX op types (default domain)."""

    def deco(fn: Converter) -> Converter:
        for n in names:
            OPS[n] = fn
        return fn

    return deco


def ident(s: str, reserved: bool = True) -> str:
    """A Python-identifier-like version of an ONNX name component (for a node, or a path under ``consts``)."""
    s = re.sub(r"[^0-9A-Za-z_]", "_", s) or "_"
    return s + "_" if reserved and s in _RESERVED or keyword.iskeyword(s) else s


def default_opset(model: onnx.ModelProto) -> int:
    vs = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if not vs:
        raise UnsupportedModel("the ONNX model imports no default-domain (ai.onnx) opset")
    return int(vs[0])


def to_torch(t: onnx.TensorProto, what: str) -> torch.Tensor:
    if t.data_type not in DTYPES:
        name = onnx.TensorProto.DataType.Name(t.data_type)
        raise UnsupportedModel(f"{what} has element type {name}, which is not supported")
    return torch.from_numpy(numpy_helper.to_array(t).copy())


def _attr(a: onnx.AttributeProto, where: str) -> Any:
    v = helper.get_attribute_value(a)
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, onnx.TensorProto):
        return to_torch(v, f"attribute {a.name} of {where}")
    if isinstance(v, list) and v and isinstance(v[0], bytes):
        return [s.decode() for s in v]
    return v


def _line(e: BaseException) -> str:
    lines = [t.strip() for t in str(e).splitlines() if t.strip()]
    return (lines[0] if lines else "")[:300]


def _has_node(args: Any) -> bool:
    found = False

    def visit(a: Any) -> Any:
        nonlocal found
        found = found or isinstance(a, fx.Node)
        return a

    fx.node.map_aggregate(args, visit)
    return found


class Lifter:
    """Rebuilds one ONNX graph as an fx graph on a plain root module, running it on ``inputs`` as it goes."""

    def __init__(self, model: onnx.ModelProto, inputs: Mapping[str, torch.Tensor]) -> None:
        self.model = model
        self.opset = default_opset(model)
        self.inputs = inputs
        self.graph = fx.Graph()
        self.root = nn.Module()
        self.vals: dict[fx.Node, Any] = {}  # example value of each node, while building
        self.env: dict[str, Value] = {}
        self.fused: dict[str, Value] = {}  # outputs a converter already produced for a later node
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        self._attrs: dict[int, fx.Node] = {}  # id(Const) -> its get_attr
        self._keep: list[Const] = []  # the Consts in _attrs, so their ids stay unique while building
        self.node = onnx.NodeProto()
        self.hint = "x"

    # -- building -------------------------------------------------------------------------------------
    def run(self) -> fx.GraphModule:
        if not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise UnsupportedModel(f"ONNX opset {self.opset} is not supported (supported: {MIN_OPSET}-{MAX_OPSET}); "
                                   "convert it with onnx.version_converter")
        g = self.model.graph
        for n in g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        for init in g.initializer:
            self.env[init.name] = Const(to_torch(init, f"initializer {init.name!r}"), init.name)
        for inp in g.input:
            if inp.name in self.env:
                continue
            if inp.name not in self.inputs:
                raise UnsupportedModel(f"no example value for graph input {inp.name!r}")
            ph = self.graph.placeholder(ident(inp.name))
            ph.meta["lift_name"] = ph.name
            self._record(ph, self.inputs[inp.name])
            self.env[inp.name] = ph
        with torch.no_grad():
            for n in g.node:
                self._convert(n)
        outs = []
        for o in g.output:
            if o.name not in self.env:
                raise UnsupportedModel(f"graph output {o.name!r} is not computed by any node")
            self.hint = ident(o.name)
            outs.append(self.materialize(self.env[o.name]))
        self.graph.output(outs[0] if len(outs) == 1 else tuple(outs))
        gm = fx.GraphModule(self.root, self.graph)
        self.vals.clear()
        return gm

    def _convert(self, n: onnx.NodeProto) -> None:
        if n.output and all(not o or o in self.fused for o in n.output):
            for o in n.output:
                if o:
                    self.env[o] = self.fused[o]
            return
        self.node = n
        domain = n.domain or ""
        conv = OPS.get(n.op_type) if domain in ("", "ai.onnx") else None
        try:
            ver = onnx.defs.get_schema(n.op_type, self.opset, domain).since_version if conv else 0
        except onnx.defs.SchemaError:
            conv = None
        if conv is None:
            v = next((o.version for o in self.model.opset_import if o.domain == domain), self.opset)
            raise UnsupportedModel(f"unsupported ONNX op {n.op_type} (domain {domain or 'ai.onnx'}, opset {v}) "
                                   f"at node {n.name!r}")
        ins: list[Any] = []
        for i in n.input:
            if i and i not in self.env:
                raise UnsupportedModel(f"node {n.name!r} reads {i!r} before it is computed (graph not sorted?)")
            ins.append(self.env[i] if i else None)
        if n.op_type not in SHAPED_DIMS_OPS:
            ins = [self.tensor(v) if isinstance(v, Dims) and v.shape else v for v in ins]
        attrs = {a.name: _attr(a, f"node {n.name!r}") for a in n.attribute}
        self.hint = ident((n.name or n.output[0]).strip("/"))
        outs = conv(self, n, ins, attrs, ver)
        if not isinstance(outs, list):
            outs = [outs]
        for k, o in enumerate(n.output):
            if not o:
                continue
            if k >= len(outs):
                if o in self.consumers or o in {x.name for x in self.model.graph.output}:
                    raise UnsupportedModel(f"output {k} of {n.op_type} node {n.name!r} is not supported")
                continue
            self.env[o] = outs[k]

    def call(self, target: Any, *args: Any, **kwargs: Any) -> Any:
        """``target(*args)`` as a graph node, or folded to a constant when no argument is computed."""
        if not _has_node((args, kwargs)):
            try:
                out = target(*fx.node.map_aggregate(args, self._eager), **fx.node.map_aggregate(kwargs, self._eager))
            except Exception as e:
                raise self.fail(f"{type(e).__name__} while folding constants: {_line(e)}") from None
            return self._wrap(out)
        fa = fx.node.map_aggregate(args, self._fx)
        fk = fx.node.map_aggregate(kwargs, self._fx)
        try:
            run = target(*fx.node.map_aggregate(fa, self._concrete), **fx.node.map_aggregate(fk, self._concrete))
        except Exception as e:  # an invalid model, or a case a converter does not handle: name the node
            raise self.fail(f"{type(e).__name__} on the example input: {_line(e)}") from None
        node = self.graph.create_node("call_function", target, tuple(fa), dict(fk), name=self.hint)
        self._record(node, run)
        return node

    def _record(self, node: fx.Node, val: Any) -> None:
        self.vals[node] = val
        node.meta["lift_name"] = node.name
        if self.node.name:
            node.meta["onnx_node"] = self.node.name
        if isinstance(val, torch.Tensor):
            node.meta["val"] = torch.empty(val.shape, dtype=val.dtype, device="meta")
        elif isinstance(val, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in val):
            node.meta["val"] = [torch.empty(t.shape, dtype=t.dtype, device="meta") for t in val]

    def _eager(self, a: Any) -> Any:
        if isinstance(a, Dims):
            raise AssertionError("sizes must be converted before a call")
        return a.t if isinstance(a, Const) else a

    def _concrete(self, a: Any) -> Any:
        return self.vals[a] if isinstance(a, fx.Node) else a

    def _wrap(self, out: Any) -> Any:
        if isinstance(out, torch.Tensor):
            return Const(out)
        if isinstance(out, (list, tuple)) and out and all(isinstance(t, torch.Tensor) for t in out):
            return [Const(t) for t in out]
        return out

    def _fx(self, a: Any) -> Any:
        if isinstance(a, Dims):
            raise AssertionError("sizes must be converted before a call")
        return self.attr(a) if isinstance(a, Const) else a

    def attr(self, c: Const) -> fx.Node:
        """A ``get_attr`` node for a constant, registering it as a buffer (once) named after its source."""
        node = self._attrs.get(id(c))
        if node is None:
            path = self._register(c.name or self.hint, c.t)
            node = self.graph.get_attr(path)
            self._attrs[id(c)] = node
            self._keep.append(c)
            self._record(node, c.t)
        return node

    def _register(self, name: str, t: torch.Tensor) -> str:
        """Register ``t`` under ``consts.`` + its ONNX name (dots kept as module paths); returns the path."""
        parts = [ident(p, reserved=False) for p in name.split(".")]
        holder = self.root._modules.get(CONSTANTS)
        if holder is None:
            holder = nn.Module()
            self.root.add_module(CONSTANTS, holder)
        for k in range(1000):
            cand = list(parts) if k == 0 else ["_".join(parts) + (f"_{k}" if k > 1 else "")]
            owner: nn.Module = holder
            ok = True
            for p in cand[:-1]:
                child = owner._modules.get(p)
                if child is None:
                    if hasattr(owner, p):
                        ok = False
                        break
                    child = nn.Module()
                    owner.add_module(p, child)
                owner = child
            if ok and not hasattr(owner, cand[-1]):
                owner.register_buffer(cand[-1], t)
                return constant_path(".".join(cand))
        raise AssertionError(f"no free buffer name for {name}")

    # -- reading values ---------------------------------------------------------------------------------
    def value(self, v: Any) -> Any:
        """The example value of ``v`` (a tensor for tensors/constants/sizes, an int for an int)."""
        if isinstance(v, Const):
            return v.t
        if isinstance(v, fx.Node):
            return self.vals[v]
        if isinstance(v, Dims):
            t = torch.tensor([self.value(i) for i in v.items],
                             dtype=torch.float32 if v.floating else torch.int64)
            return t.reshape(()) if v.scalar else t.reshape(v.shape) if v.shape else t
        return v

    def shape(self, v: Any) -> tuple[int, ...]:
        return tuple(self.value(v).shape)

    def dtype(self, v: Any) -> torch.dtype:
        return self.value(v).dtype

    def items(self, v: Any, what: str = "a size argument") -> list[Any]:
        """A shape-like input as a list of ints / run-time int nodes."""
        if isinstance(v, Dims):
            return list(v.items)
        if isinstance(v, Const):
            return v.t.flatten().tolist()
        raise UnsupportedModel(f"{self.where()}: {what} is computed from tensor data at run time; only constants "
                               "and sizes derived from Shape are supported")

    def const(self, v: Any, what: str) -> torch.Tensor:
        if isinstance(v, Const):
            return v.t
        if isinstance(v, Dims) and all(isinstance(i, (int, float)) for i in v.items):
            return self.value(v)
        raise UnsupportedModel(f"{self.where()}: {what} must be a constant")

    def tensor(self, v: Any) -> Any:
        """``v`` as something an aten op takes: sizes become an int64 constant, or a stacked run-time tensor."""
        if not isinstance(v, Dims):
            return v
        if all(not isinstance(i, fx.Node) for i in v.items):
            return Const(self.value(v))
        dt = torch.float32 if v.floating else torch.int64
        parts = [self.call(aten.scalar_tensor, i, dtype=dt) if isinstance(i, fx.Node)
                 else Const(torch.tensor(i, dtype=dt)) for i in v.items]
        if v.scalar:
            return parts[0]
        out = self.call(aten.stack, parts)
        return self.call(aten.reshape, out, list(v.shape)) if v.shape else out

    def materialize(self, v: Any) -> Any:
        """A graph node for ``v`` (constants become a get_attr)."""
        v = self.tensor(v)
        if isinstance(v, Const):
            return self.attr(v)
        if v is None:
            raise UnsupportedModel(f"{self.where()}: a missing optional value is used")
        return v

    def where(self) -> str:
        return f"{self.node.op_type} node {self.node.name!r}"

    def fail(self, why: str) -> UnsupportedModel:
        return UnsupportedModel(f"{self.where()}: {why}")
