"""cimc's own checks of an ONNX model, after onnx's checker and before anything allocates or computes.

onnx's checker accepts files that cimc cannot take as they are: a tensor whose bytes disagree with its
dims, a weight type cimc cannot compute with, attribute values that only fail deep inside a pass, tensors
of terabytes. :func:`check_container` runs before anything resolves names or reads external data;
:func:`validate_model` runs right after the checker. Each problem is a one-line
:class:`~cimc.errors.CimcError` that names the node or tensor and the field:

* names (nodes, values, tensors, attributes) are valid UTF-8; value names are unique (one producer each);
* external data: a location without NUL bytes; ``offset``/``length`` decimal, non-negative and inside the
  file; the length matches the tensor's dims and type;
* every tensor: a known ``data_type`` cimc computes with (no STRING, complex, 8/6/4/2-bit floats or ints),
  non-negative dims, stored bytes (or typed values) matching dims × dtype, size within the memory budget;
* at least one node and one graph output;
* attributes: Conv/ConvTranspose ``group`` ≥ 1 dividing the channels, ``kernel_shape`` equal to the
  weight's, strides and dilations ≥ 1, pads ≥ 0; pooling kernels ≥ 1 and no larger than the padded input;
  Gemm ``transA=1`` only on a constant A (cimc keeps samples on the first axis); Flatten ``axis`` in range;
  Cast to a type cimc computes with;
* sizes: every value's shape is inferred (unknown dims count as 1) and its bytes compared with the memory
  budget, so a ``ConstantOfShape``/``Range``/``Expand``/``Tile``/``Pad``/``Resize`` bomb is refused before
  constant folding or a run allocates it.

The memory budget (bytes) defaults to :data:`DEFAULT_MEMORY_BUDGET`; the ``CIMC_MEMORY_BUDGET`` environment
variable or ``cimc --memory-budget SIZE`` (e.g. ``16G``) raises or lowers it.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, shape_inference

from cimc.errors import ModelError, ResourceError

__all__ = [
    "COMPUTABLE_TYPES",
    "DEFAULT_MEMORY_BUDGET",
    "check_container",
    "check_array_size",
    "memory_budget",
    "parse_size",
    "samples_per_pass",
    "set_memory_budget",
    "validate_model",
]

logger = logging.getLogger(__name__)

DEFAULT_MEMORY_BUDGET = 4 << 30  # bytes; the largest single tensor (or data array) cimc will hold
_override: int | None = None

COMPUTABLE_TYPES = {
    TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.INT8,
    TensorProto.UINT8, TensorProto.INT16, TensorProto.UINT16, TensorProto.INT32, TensorProto.UINT32,
    TensorProto.INT64, TensorProto.UINT64, TensorProto.BOOL,
}
_ITEMSIZE = {
    TensorProto.FLOAT: 4, TensorProto.DOUBLE: 8, TensorProto.FLOAT16: 2, TensorProto.BFLOAT16: 2,
    TensorProto.INT8: 1, TensorProto.UINT8: 1, TensorProto.INT16: 2, TensorProto.UINT16: 2, TensorProto.INT32: 4,
    TensorProto.UINT32: 4, TensorProto.INT64: 8, TensorProto.UINT64: 8, TensorProto.BOOL: 1,
}
# Which typed field holds the values when raw_data is not used (onnx.proto's comments).
_TYPED_FIELD = {
    TensorProto.FLOAT: "float_data", TensorProto.DOUBLE: "double_data", TensorProto.INT64: "int64_data",
    TensorProto.UINT32: "uint64_data", TensorProto.UINT64: "uint64_data",
    **{t: "int32_data" for t in (TensorProto.INT32, TensorProto.INT16, TensorProto.INT8, TensorProto.UINT16,
                                 TensorProto.UINT8, TensorProto.BOOL, TensorProto.FLOAT16, TensorProto.BFLOAT16)},
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)


# ------------------------------------------------------------------------------------------ the budget
def parse_size(text: str) -> int:
    """``"4G"``, ``"512M"``, ``"1.5GiB"``, ``"1000000"`` → bytes (binary prefixes)."""
    match = _SIZE_RE.match(str(text))
    if not match:
        raise ResourceError(f"memory budget {text!r} is not a size; write e.g. 4G, 512M or a number of bytes")
    number, prefix = float(match.group(1)), match.group(2).lower()
    value = int(number * (1 << (10 * " kmgt".index(prefix or " "))))
    if value <= 0:
        raise ResourceError(f"memory budget {text!r} must be positive; write e.g. 4G")
    return value


def set_memory_budget(size: int | str | None) -> None:
    """Set the budget for this process (None: back to ``CIMC_MEMORY_BUDGET`` or the default)."""
    global _override
    _override = None if size is None else (size if isinstance(size, int) else parse_size(size))


def memory_budget() -> int:
    """The memory budget in bytes: :func:`set_memory_budget`, else ``CIMC_MEMORY_BUDGET``, else 4 GiB."""
    if _override is not None:
        return _override
    env = os.environ.get("CIMC_MEMORY_BUDGET")
    return parse_size(env) if env else DEFAULT_MEMORY_BUDGET


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.3g} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.3g} MiB"


def _over_budget(what: str, nbytes: float, fix: str) -> ResourceError:
    budget = memory_budget()
    return ResourceError(
        f"{what} needs {_gib(nbytes)}, over the memory budget of {_gib(budget)}; {fix}, or raise the budget with "
        f"--memory-budget SIZE (or CIMC_MEMORY_BUDGET)"
    )


def check_array_size(shape: tuple[int, ...], itemsize: int, what: str, fix: str = "use a smaller file") -> None:
    """Refuse an array of ``shape`` × ``itemsize`` bytes past the memory budget (before reading it)."""
    nbytes = math.prod(int(d) for d in shape) * itemsize
    if nbytes > memory_budget():
        raise _over_budget(what, nbytes, fix)


# ------------------------------------------------------------------------------------------ traversal
def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """The graph and every subgraph (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _graphs(g)


def _tensors(proto: onnx.ModelProto) -> Iterator[tuple[onnx.TensorProto, str]]:
    """Every tensor (initializers, Constant/attribute tensors, subgraphs) with a description of where it is."""
    for graph in _graphs(proto.graph):
        for t in graph.initializer:
            yield t, f"initializer '{_text(t.name)}'"
        for node in graph.node:
            for attr in node.attribute:
                where = f"node '{_text(node.name)}' ({_text(node.op_type)}) attribute '{_text(attr.name)}'"
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t, where
                elif attr.type == onnx.AttributeProto.TENSORS:
                    yield from ((t, where) for t in attr.tensors)


def _text(value: Any) -> str:
    """A protobuf string field as text (proto2 hands back bytes for invalid UTF-8)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


# ------------------------------------------------------------------------------------------ before loading
def _check_names(proto: onnx.ModelProto, where: str) -> None:
    def bad(field: str, value: Any) -> None:
        if isinstance(value, bytes):
            raise ModelError(f"{where}: {field} {_text(value)!r} is not valid UTF-8; re-export the model with UTF-8 "
                             "names")
        if "\x00" in value:
            raise ModelError(f"{where}: {field} {value!r} contains a NUL byte; re-export the model")

    for graph in _graphs(proto.graph):
        bad("graph name", graph.name)
        for group, kind in ((graph.input, "graph input"), (graph.output, "graph output"),
                            (graph.value_info, "value_info"), (graph.initializer, "initializer")):
            for item in group:
                bad(f"{kind} name", item.name)
        for i, node in enumerate(graph.node):
            label = f"node #{i}"
            bad(f"{label} name", node.name)
            bad(f"{label} op_type", node.op_type)
            bad(f"{label} domain", node.domain)
            for name in list(node.input) + list(node.output):
                bad(f"{label} value name", name)
            for attr in node.attribute:
                bad(f"{label} attribute name", attr.name)
                if attr.type == onnx.AttributeProto.STRING:
                    try:
                        _text(attr.s) if isinstance(attr.s, str) else attr.s.decode("utf-8")
                    except UnicodeDecodeError:
                        raise ModelError(f"{where}: {label} attribute '{attr.name}' is not valid UTF-8; re-export the "
                                         "model") from None
    for imp in proto.opset_import:
        bad("opset domain", imp.domain)


def _expected_bytes(t: onnx.TensorProto) -> int | None:
    size = _ITEMSIZE.get(t.data_type)
    return None if size is None else math.prod(t.dims) * size


def _check_external(proto: onnx.ModelProto, folder: Path, where: str) -> None:
    for t, label in _tensors(proto):
        if t.data_location != TensorProto.EXTERNAL:
            continue
        entries: dict[str, str] = {}
        for e in t.external_data:
            entries[_text(e.key)] = _text(e.value)
        location = entries.get("location", "")
        if not location:
            raise ModelError(f"{where}: {label} is stored externally but names no 'location'; re-export the model")
        if "\x00" in location:
            raise ModelError(f"{where}: {label} external data location {location!r} contains a NUL byte; re-export "
                             "the model")
        numbers: dict[str, int] = {}
        for key in ("offset", "length"):
            if key not in entries:
                continue
            text = entries[key].strip()
            if not text.isdigit() or not text.isascii():
                raise ModelError(f"{where}: {label} external data '{key}' is {entries[key]!r}, not a non-negative "
                                 "whole number of bytes; re-export the model")
            numbers[key] = int(text)
        if any(d < 0 for d in t.dims):
            raise ModelError(f"{where}: {label} has a negative dimension {list(t.dims)}; re-export the model")
        file = folder / location
        try:
            size = file.stat().st_size if file.is_file() else None
        except (OSError, ValueError):
            size = None
        if size is None:
            continue  # the frontend's own check names the missing or outside file
        offset = numbers.get("offset", 0)
        if offset > size:
            raise ModelError(f"{where}: {label} external data offset {offset} is past the end of {location!r} "
                             f"({size} bytes); the data file is truncated or belongs to another model")
        length = numbers.get("length", size - offset)
        if offset + length > size:
            raise ModelError(
                f"{where}: {label} external data (offset {offset}, length {length}) runs past the end of "
                f"{location!r} ({size} bytes); the data file is truncated or belongs to another model"
            )
        expected = _expected_bytes(t)
        if expected is not None and length != expected:
            raise ModelError(
                f"{where}: {label} external data has {length} bytes but dims {list(t.dims)} of "
                f"{_type_name(t.data_type)} need {expected}; re-export the model"
            )
        if expected is not None and expected > memory_budget():
            raise _over_budget(f"{where}: {label}", expected, "use a smaller model")


def check_container(proto: onnx.ModelProto, folder: str | os.PathLike[str], where: str = "model") -> None:
    """Checks that must pass before names are used or external data is read (UTF-8 names, external fields)."""
    _check_names(proto, where)
    _check_external(proto, Path(folder), where)


# ------------------------------------------------------------------------------------------ after the checker
def _type_name(data_type: int) -> str:
    try:
        return TensorProto.DataType.Name(data_type)
    except ValueError:
        return f"unknown data_type {data_type}"


def _check_type(data_type: int, what: str, where: str) -> None:
    if data_type in COMPUTABLE_TYPES:
        return
    if data_type not in TensorProto.DataType.values():
        raise ModelError(f"{where}: {what} has an unknown data_type {data_type}; the file is corrupt or newer than "
                         f"onnx {onnx.__version__}: re-export it")
    raise ModelError(f"{where}: {what} has type {_type_name(data_type)}, which cimc cannot compute with; export the "
                     "model with float32 weights and inputs (integer and bool tensors are fine for shapes and indices)")


def _check_tensor(t: onnx.TensorProto, label: str, where: str) -> None:
    _check_type(t.data_type, label, where)
    if any(d < 0 for d in t.dims):
        raise ModelError(f"{where}: {label} has a negative dimension {list(t.dims)}; re-export the model")
    count = math.prod(t.dims)
    nbytes = count * _ITEMSIZE[t.data_type]
    if nbytes > memory_budget():
        raise _over_budget(f"{where}: {label} ({list(t.dims)})", nbytes, "use a smaller model")
    if t.data_location == TensorProto.EXTERNAL:
        return  # checked against the file before it was read; loaded data is in raw_data below
    if t.HasField("raw_data"):
        if len(t.raw_data) != nbytes:
            raise ModelError(
                f"{where}: {label} has {len(t.raw_data)} bytes of raw_data but dims {list(t.dims)} of "
                f"{_type_name(t.data_type)} need {nbytes}; the tensor is corrupt: re-export the model"
            )
        return
    field = _TYPED_FIELD[t.data_type]
    stored = len(getattr(t, field))
    wanted = count  # one entry per element, whatever the field's own width
    if stored != wanted:
        raise ModelError(
            f"{where}: {label} stores {stored} value(s) in {field} but dims {list(t.dims)} need {wanted}; the tensor "
            "is corrupt: re-export the model"
        )


def _ints(node: onnx.NodeProto, name: str) -> list[int] | None:
    for attr in node.attribute:
        if attr.name == name:
            return list(attr.ints) if attr.type == onnx.AttributeProto.INTS else [attr.i]
    return None


def _int(node: onnx.NodeProto, name: str, default: int) -> int:
    for attr in node.attribute:
        if attr.name == name:
            return int(attr.i)
    return default


def _light_copy(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The model without its large initializers (they become inputs) and with unknown input dims set to 1.

    Shape inference on this copy is cheap whatever the model's size, and still sees the small constants
    (shape tensors, Range bounds) that decide how large the computed tensors are.
    """
    light = onnx.ModelProto()
    light.ir_version = max(proto.ir_version, 4)
    light.opset_import.extend(proto.opset_import)
    light.functions.extend(proto.functions)
    g = light.graph
    g.name = proto.graph.name
    g.node.extend(proto.graph.node)
    g.output.extend(proto.graph.output)
    init_names = set()
    for t in proto.graph.initializer:
        init_names.add(t.name)
        if t.data_location != TensorProto.EXTERNAL and math.prod(t.dims) <= 4096:
            g.initializer.append(t)
        else:
            g.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    for inp in proto.graph.input:
        if inp.name in init_names:
            continue
        copy = g.input.add()
        copy.CopyFrom(inp)
        if copy.type.HasField("tensor_type") and copy.type.tensor_type.HasField("shape"):
            for d in copy.type.tensor_type.shape.dim:
                if not (d.HasField("dim_value") and d.dim_value > 0):
                    d.Clear()
                    d.dim_value = 1
    return light


def _shapes(proto: onnx.ModelProto, data_prop: bool) -> dict[str, tuple[int, list[int | None]]]:
    """name → (elem_type, dims with None where unknown) from shape inference on the light copy.

    Data propagation (``data_prop``) computes small constant tensors such as a Range's values: run it only
    after the sizes known without it passed the budget, since onnx would materialise a huge Range itself.
    """
    try:
        inferred = shape_inference.infer_shapes(_light_copy(proto), strict_mode=False, data_prop=data_prop)
    except Exception as exc:  # inconsistent graphs are reported by the frontend's strict inference
        logger.debug("lenient shape inference failed: %s", exc)
        return {}
    out: dict[str, tuple[int, list[int | None]]] = {}
    declared = {v.name for v in inferred.graph.input}
    for v in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        tt = v.type.tensor_type
        if not v.type.HasField("tensor_type"):
            continue
        if not tt.HasField("shape"):
            out[v.name] = (tt.elem_type, None)  # the type is still known
            continue
        # An inferred 0 is how onnx's lenient inference sometimes reports a dimension it derived from an unknown
        # one (a dynamic audio length through a scripted branch): unknown, not empty. A declared 0 is kept.
        low = 0 if v.name in declared else 1
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value >= low else None for d in tt.shape.dim]
        out[v.name] = (tt.elem_type, dims)
    for t in proto.graph.initializer:
        out[t.name] = (t.data_type, list(t.dims))
    return out


def _constants(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Small constant values (initializers and Constant nodes of the main graph) for size estimates."""
    values: dict[str, np.ndarray] = {}
    for t in proto.graph.initializer:
        if t.data_location != TensorProto.EXTERNAL and math.prod(t.dims) <= 64 and t.data_type in _ITEMSIZE:
            try:
                values[t.name] = numpy_helper.to_array(t)
            except Exception:  # noqa: BLE001 - malformed tensors were refused above; be lenient here
                pass
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.output) == 1:
            for attr in node.attribute:
                if attr.name == "value" and math.prod(attr.t.dims) <= 64 and attr.t.data_type in _ITEMSIZE:
                    try:
                        values[node.output[0]] = numpy_helper.to_array(attr.t)
                    except Exception:  # noqa: BLE001
                        pass
    return values


def _estimated_elements(node: onnx.NodeProto, shapes: dict[str, Any], consts: dict[str, np.ndarray]) -> float | None:
    """Elements of a generator op's output computed from its constant inputs, where shape inference gave up."""

    def const(i: int) -> np.ndarray | None:
        return consts.get(node.input[i]) if len(node.input) > i and node.input[i] else None

    def elems(i: int) -> float | None:
        if len(node.input) <= i or node.input[i] not in shapes:
            return None
        dims = shapes[node.input[i]][1]
        return None if dims is None or any(d is None for d in dims) else float(math.prod(dims))

    op = node.op_type
    try:
        if op in ("ConstantOfShape", "Expand") and const(op == "Expand" and 1 or 0) is not None:
            return float(np.prod(np.abs(const(1 if op == "Expand" else 0).astype(np.float64))))
        if op == "Range" and all(const(i) is not None for i in range(3)):
            start, limit, delta = (float(const(i).reshape(-1)[0]) for i in range(3))
            return max(0.0, math.ceil((limit - start) / delta)) if delta != 0 else float("inf")
        if op == "Tile" and const(1) is not None and elems(0) is not None:
            return elems(0) * float(np.prod(np.abs(const(1).astype(np.float64))))
        if op == "Pad" and const(1) is not None and node.input[0] in shapes:
            dims = shapes[node.input[0]][1]
            pads = const(1).astype(np.float64).reshape(-1)
            if dims is not None and all(d is not None for d in dims) and len(pads) == 2 * len(dims):
                return float(np.prod([d + pads[i] + pads[i + len(dims)] for i, d in enumerate(dims)]))
        if op == "Resize":
            scales, sizes = const(2), const(3)
            if sizes is not None:
                return float(np.prod(np.abs(sizes.astype(np.float64))))
            if scales is not None and scales.size and elems(0) is not None:
                return elems(0) * float(np.prod(np.abs(scales.astype(np.float64))))
    except (TypeError, ValueError, OverflowError, IndexError):
        return None
    return None


def _check_sizes(proto: onnx.ModelProto, shapes: dict[str, Any], where: str) -> None:
    budget = memory_budget()
    consts = _constants(proto)
    for node in proto.graph.node:
        for out in node.output:
            if not out:
                continue
            elem_type, dims = shapes.get(out, (TensorProto.FLOAT, None))
            itemsize = _ITEMSIZE.get(elem_type, 4)
            if dims is not None and all(d is not None for d in dims):
                count = float(math.prod(dims))
            else:
                estimate = _estimated_elements(node, shapes, consts)
                if estimate is None:
                    continue
                count = estimate
            if count * itemsize > budget:
                raise _over_budget(
                    f"{where}: node '{node.name}' ({node.op_type}) output '{out}'"
                    + (f" of shape {dims}" if dims is not None and None not in dims else ""),
                    count * itemsize, "make the tensor smaller in the exported model",
                )


def _spatial(shapes: dict[str, Any], name: str) -> list[int | None] | None:
    entry = shapes.get(name)
    return None if entry is None else entry[1]


def _check_conv(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto], shapes: dict[str, Any], label: str,
                where: str) -> None:
    group = _int(node, "group", 1)
    if group < 1:
        raise ModelError(f"{where}: {label} has group={group}; it must be 1 or more")
    weight = inits.get(node.input[1]) if len(node.input) > 1 else None
    w_dims = list(weight.dims) if weight is not None else (shapes.get(node.input[1], (0, None))[1]
                                                          if len(node.input) > 1 else None)
    if w_dims is not None and None in w_dims:
        w_dims = None
    if w_dims is not None and len(w_dims) < 3:
        raise ModelError(f"{where}: {label} has a weight of shape {w_dims}; a convolution weight has rank 3 or more")
    spatial = len(w_dims) - 2 if w_dims is not None else None
    kernel = _ints(node, "kernel_shape")
    if kernel is not None:
        if any(k < 1 for k in kernel):
            raise ModelError(f"{where}: {label} has kernel_shape={kernel}; every size must be 1 or more")
        if w_dims is not None and kernel != w_dims[2:]:
            raise ModelError(f"{where}: {label} has kernel_shape={kernel} but its weight is {w_dims} "
                             f"(kernel {w_dims[2:]}); re-export the model")
    for name in ("strides", "dilations"):
        values = _ints(node, name)
        if values is not None and (any(v < 1 for v in values) or (spatial is not None and len(values) != spatial)):
            raise ModelError(f"{where}: {label} has {name}={values}; give {spatial or 'one'} value(s) of 1 or more")
    pads = _ints(node, "pads")
    if pads is not None and (any(p < 0 for p in pads) or (spatial is not None and len(pads) != 2 * spatial)):
        raise ModelError(f"{where}: {label} has pads={pads}; give {2 * spatial if spatial else 'two per axis'} "
                         "value(s) of 0 or more")
    if w_dims is None:
        return
    x = _spatial(shapes, node.input[0])
    if node.op_type == "Conv":
        if w_dims[0] % group:
            raise ModelError(f"{where}: {label} has group={group}, which does not divide its {w_dims[0]} output "
                             "channels; re-export the model")
        if x is not None and len(x) >= 2 and x[1] is not None and x[1] != w_dims[1] * group:
            raise ModelError(f"{where}: {label} gets {x[1]} input channels but its weight {w_dims} with group={group} "
                             f"expects {w_dims[1] * group}; re-export the model")
        if x is not None and len(x) == len(w_dims):
            dil = _ints(node, "dilations") or [1] * spatial
            p = pads or [0] * (2 * spatial)
            if _string(node, "auto_pad") in ("", "NOTSET"):
                for i in range(spatial):
                    size = x[2 + i]
                    extent = dil[i] * (w_dims[2 + i] - 1) + 1
                    if size is not None and size + p[i] + p[i + spatial] < extent:
                        raise ModelError(
                            f"{where}: {label}: kernel extent {extent} on axis {2 + i} is larger than the padded "
                            f"input ({size} + pads {p[i]}, {p[i + spatial]}); re-export the model")
    elif x is not None and len(x) >= 2 and x[1] is not None and x[1] != w_dims[0]:
        raise ModelError(f"{where}: {label} gets {x[1]} input channels but its weight {w_dims} expects {w_dims[0]}; "
                         "re-export the model")


def _string(node: onnx.NodeProto, name: str) -> str:
    for attr in node.attribute:
        if attr.name == name:
            return _text(attr.s)
    return ""


def _check_pool(node: onnx.NodeProto, shapes: dict[str, Any], label: str, where: str) -> None:
    kernel = _ints(node, "kernel_shape")
    if kernel is None:
        return  # the checker requires it; Global* pools have none
    if any(k < 1 for k in kernel):
        raise ModelError(f"{where}: {label} has kernel_shape={kernel}; every size must be 1 or more")
    n = len(kernel)
    for name in ("strides", "dilations"):
        values = _ints(node, name)
        if values is not None and (any(v < 1 for v in values) or len(values) != n):
            raise ModelError(f"{where}: {label} has {name}={values}; give {n} value(s) of 1 or more")
    pads = _ints(node, "pads") or [0] * (2 * n)
    if any(p < 0 for p in pads) or len(pads) != 2 * n:
        raise ModelError(f"{where}: {label} has pads={pads}; give {2 * n} value(s) of 0 or more")
    if any(pads[i] >= kernel[i] or pads[i + n] >= kernel[i] for i in range(n)):
        raise ModelError(f"{where}: {label} has pads={pads} not smaller than its kernel {kernel}; re-export the "
                         "model")
    x = _spatial(shapes, node.input[0])
    if x is None or len(x) != n + 2 or _string(node, "auto_pad") not in ("", "NOTSET"):
        return
    dil = _ints(node, "dilations") or [1] * n
    for i in range(n):
        extent = dil[i] * (kernel[i] - 1) + 1
        if x[2 + i] is not None and x[2 + i] + pads[i] + pads[i + n] < extent:
            raise ModelError(f"{where}: {label}: kernel {kernel} is larger than its padded input "
                             f"{x[2:]} on axis {2 + i}; re-export the model")


def _check_input_types(node: onnx.NodeProto, shapes: dict[str, Any], opset: int, label: str, where: str) -> None:
    """Inputs that share a type variable in the op's schema have one type, and one the schema allows.

    onnx's checker and its shape inference let a UINT32 weight on a float Conv through; onnxruntime refuses
    the model, and cimc would compute with a wrong (converted) weight.
    """
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, "")
    except Exception:  # noqa: BLE001 - unknown ops are reported by the op-support check, with the others
        return
    formal = list(schema.inputs)
    if not formal:
        return
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    seen: dict[str, tuple[str, int]] = {}
    for i, name in enumerate(node.input):
        if not name or name not in shapes:
            continue
        param = formal[min(i, len(formal) - 1)]
        if i >= len(formal) and param.option != onnx.defs.OpSchema.FormalParameterOption.Variadic:
            continue
        var = param.type_str
        elem = shapes[name][0]
        if not elem:
            continue
        text = f"tensor({TensorProto.DataType.Name(elem).lower()})" if elem in TensorProto.DataType.values() else ""
        if var in allowed and text and text not in allowed[var]:
            raise ModelError(f"{where}: {label} input '{name}' has type {TensorProto.DataType.Name(elem)}, which "
                             f"{node.op_type} does not take there; re-export the model")
        if var in seen and seen[var][1] != elem:
            other = seen[var][0]
            raise ModelError(
                f"{where}: {label} input '{name}' is {TensorProto.DataType.Name(elem)} but input '{other}' is "
                f"{TensorProto.DataType.Name(seen[var][1])}; {node.op_type} needs them of one type: re-export the model"
            )
        seen.setdefault(var, (name, elem))


def _check_node(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto], shapes: dict[str, Any], where: str,
                opset: int = 13) -> None:
    if node.domain not in ("", "ai.onnx"):
        return
    op = node.op_type
    label = f"node '{node.name}' ({op})"
    _check_input_types(node, shapes, opset, label, where)
    if op in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
        for name in node.input:
            t = inits.get(name)
            if t is None or t.data_type not in (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16):
                continue
            values = numpy_helper.to_array(t)
            bad = int(values.size - np.count_nonzero(np.isfinite(values)))
            if bad:
                raise ModelError(f"{where}: {label} weight '{name}' has {bad} non-finite value(s) (NaN or inf); a "
                                 "crossbar cannot hold them: fix the trained weights")
    if op in ("Conv", "ConvTranspose") and len(node.input) >= 2:
        _check_conv(node, inits, shapes, label, where)
    elif op in ("MaxPool", "AveragePool", "LpPool"):
        _check_pool(node, shapes, label, where)
    elif op == "Gemm" and _int(node, "transA", 0) and node.input[0] not in inits:
        raise ModelError(f"{where}: {label} has transA=1 on a computed input; cimc keeps samples on the first axis: "
                         "re-export with transA=0 (a Transpose before the Gemm)")
    elif op == "Flatten":
        axis = _int(node, "axis", 1)
        x = _spatial(shapes, node.input[0])
        if x is not None and not -len(x) <= axis <= len(x):
            raise ModelError(f"{where}: {label} has axis={axis} outside [{-len(x)}, {len(x)}] for its rank-{len(x)} "
                             "input; re-export the model")
    elif op == "Cast":
        _check_type(_int(node, "to", TensorProto.FLOAT), f"{label} attribute 'to'", where)
    if op not in _AXIS_EXEMPT and node.input and node.input[0]:
        _check_axes(node, shapes, label, where)


# Ops whose axis attributes do not index their first input's dimensions (or are checked above).
_AXIS_EXEMPT = {"Flatten", "OneHot", "Scan", "Loop", "If", "CumSum", "Unsqueeze", "ConcatFromSequence",
                "SplitToSequence", "DFT", "STFT", "QuantizeLinear", "DequantizeLinear"}


def _check_axes(node: onnx.NodeProto, shapes: dict[str, Any], label: str, where: str) -> None:
    """``axis``/``axes`` attributes index the first input's dimensions: each must lie in [-rank, rank-1]."""
    x = _spatial(shapes, node.input[0])
    if x is None:
        return
    rank = len(x)
    for name in ("axis", "axes"):
        values = _ints(node, name)
        if values is None:
            continue
        for v in values:
            if not -rank <= v < rank or (rank == 0 and v not in (0, -1)):
                raise ModelError(f"{where}: {label} has {name}={values if name == 'axes' else v} outside "
                                 f"[{-rank}, {rank - 1}] for its rank-{rank} input; re-export the model")


def _check_unique(graph: onnx.GraphProto, where: str) -> None:
    producer: dict[str, str] = {}
    for inp in graph.input:
        producer.setdefault(inp.name, "a graph input")
    for t in graph.initializer:
        if producer.get(t.name, "a graph input") != "a graph input":
            raise ModelError(f"{where}: initializer '{t.name}' is given twice; re-export the model")
        producer[t.name] = "a graph input" if t.name in producer else "an initializer"
    for node in graph.node:
        for out in node.output:
            if not out:
                continue
            if out in producer:
                raise ModelError(f"{where}: value '{out}' is produced by node '{node.name}' ({node.op_type}) and by "
                                 f"{producer[out]}; every value needs a unique name: re-export the model")
            producer[out] = f"node '{node.name}' ({node.op_type})"


def validate_model(proto: onnx.ModelProto, where: str = "model") -> None:
    """cimc's checks after onnx's checker (see the module docstring); raises a one-line CimcError."""
    graph = proto.graph
    if len(graph.node) == 0:
        raise ModelError(f"{where}: the graph has no nodes; there is nothing to compile")
    if len(graph.output) == 0:
        raise ModelError(f"{where}: the graph has no outputs; declare the model's results as graph outputs")
    for t, label in _tensors(proto):
        _check_tensor(t, label, where)
    for group, kind in ((graph.input, "graph input"), (graph.output, "graph output")):
        for v in group:
            if v.type.HasField("tensor_type"):
                _check_type(v.type.tensor_type.elem_type, f"{kind} '{v.name}'", where)
    for sub in _graphs(graph):
        _check_unique(sub, where)
    _check_sizes(proto, {t.name: (t.data_type, list(t.dims)) for t in graph.initializer}, where)
    _check_sizes(proto, _shapes(proto, data_prop=False), where)
    shapes = _shapes(proto, data_prop=True)
    _check_sizes(proto, shapes, where)
    inits = {t.name: t for t in graph.initializer}
    opset = next((i.version for i in proto.opset_import if i.domain in ("", "ai.onnx")), 13)
    for node in graph.node:
        _check_node(node, inits, shapes, where, opset)


def samples_per_pass(model: Any, copies: int, requested: int) -> int:
    """How many samples one forward pass may take so its largest tensor stays within the memory budget.

    ``model`` is an onnx-ir model with static shapes (its first axis the batch it was compiled for);
    ``copies`` the Monte Carlo instances riding in the batch. Refuses a model whose single sample already
    exceeds the budget (a Conv with huge pads compiles, but no run could hold it).
    """
    largest = 0
    batch = 1
    for value in list(model.graph.inputs) + [o for node in model.graph for o in node.outputs]:
        shape = value.shape
        if shape is None or not len(shape) or not all(isinstance(d, int) for d in shape):
            continue
        if value in model.graph.inputs:
            batch = max(batch, int(shape[0]))
        largest = max(largest, math.prod(shape) * 4)  # float32 on the torch side
    per_sample = largest / batch * 3  # a pass holds an op's input, its output and an unrolled copy at once
    budget = memory_budget()
    if per_sample * copies > budget:
        raise _over_budget(f"one sample on {copies} chip instance(s)", per_sample * copies,
                           "use fewer instances or a smaller model")
    return max(1, min(requested, int(budget // max(per_sample * copies, 1))))
