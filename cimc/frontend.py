"""ONNX import: from a file on disk to a validated, shape-inferred onnx-ir model.

The steps, each of which either succeeds or raises a one-line :class:`~cimc.errors.CimcError`:

1. read the file (missing path, a directory, an empty or truncated file, not a protobuf → InputError);
2. external data is loaded only from inside the model's own folder (no absolute paths, no ``..``);
3. the default-domain opset must be between 9 and the newest onnx knows; models older than opset 13 are
   converted to 13 so every op has one set of semantics;
4. inputs the user freezes (``input_values``, e.g. a sample-rate input) become constants, and shapes the user
   fixes (``input_shapes``, as onnxruntime and TensorRT users do at load time) replace dynamic dimensions;
5. the batch dimension of every remaining graph input is fixed (default 1); any other unknown dimension is an
   error that names the input and the ``--input-shape`` that fixes it;
6. ONNX shape inference (strict), then conversion to onnx-ir; every node gets a unique, non-empty name
   (nodes are keyed by name in the compiled model's metadata, the schedule and the export).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx
import numpy as np
import onnx_ir as ir
from google.protobuf.message import DecodeError
from onnx import helper, numpy_helper, shape_inference, version_converter

from cimc import validate
from cimc.errors import InputError, ModelError
from cimc.ir import name_nodes

__all__ = [
    "CANONICAL_OPSET",
    "MIN_OPSET",
    "load_model",
    "load_onnx",
    "parse_input_shape",
    "parse_input_value",
    "save_model",
]

logger = logging.getLogger(__name__)

MIN_OPSET = 9
CANONICAL_OPSET = 13  # older models are converted up to this opset on import


def _default_opset(proto: onnx.ModelProto) -> int | None:
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return None


def _check_external_data(proto: onnx.ModelProto, folder: Path) -> None:
    """External tensors must live in files inside the model's folder."""
    root = folder.resolve()
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (root / location).resolve()
        if os.path.isabs(location) or root not in target.parents:
            raise InputError(
                f"tensor '{tensor.name}' points to external data {location!r} outside the model's folder; "
                "move the data file next to the .onnx file and refer to it by a relative name"
            )
        if not target.is_file():
            raise InputError(
                f"tensor '{tensor.name}' needs external data file {location!r}, which is missing; "
                "copy it next to the .onnx file"
            )


def load_onnx(path: str | os.PathLike[str], *, check_shapes: bool = True) -> onnx.ModelProto:
    """Read an ONNX file (with its external data) and check it, raising InputError on anything malformed.

    ``check_shapes=False`` leaves cimc's shape-dependent checks (:func:`cimc.validate.validate_model`) to the
    caller, which runs them once dynamic dimensions are fixed (with a symbolic audio length, lenient shape
    inference can report a kernel larger than its input)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file; check the path to the .onnx model")
    if p.is_dir():
        raise InputError(f"{p}: is a folder, not an .onnx file; give the path to the model file")
    data = p.read_bytes()
    if not data:
        raise InputError(f"{p}: the file is empty; re-export the model")
    try:
        proto = onnx.ModelProto()
        proto.ParseFromString(data)
    except (DecodeError, RuntimeWarning, ValueError) as exc:
        raise InputError(
            f"{p}: not a valid ONNX file ({type(exc).__name__}); the file is truncated or of another format: "
            "re-export it with torch.onnx.export or onnx.save"
        ) from exc
    if not proto.HasField("graph") or len(proto.graph.node) == 0:
        raise InputError(f"{p}: not an ONNX model (no graph); the file is truncated or of another format")
    validate.check_container(proto, p.parent, p.name)  # UTF-8 names, external data fields: before they are used
    _check_external_data(proto, p.parent)
    onnx.external_data_helper.load_external_data_for_model(proto, str(p.parent))
    try:
        onnx.checker.check_model(proto)
    except (onnx.checker.ValidationError, UnicodeDecodeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"{p}: the ONNX checker rejects the model ({first}); the file is truncated or corrupt") from exc
    if check_shapes:
        validate.validate_model(proto, p.name)
    return proto


def _dims_text(dims: Sequence[Any]) -> str:
    return ",".join(str(d) for d in dims)


def _declared_dims(inp: onnx.ValueInfoProto) -> list[int | str] | None:
    """The input's declared dimensions (int when static, the symbol or '?' when dynamic), or None if unranked."""
    t = inp.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or "?") for d in t.shape.dim]


def _suggested_shape(inp: onnx.ValueInfoProto, batch: int) -> str:
    dims = _declared_dims(inp) or []
    shown = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or "?")
             for d in inp.type.tensor_type.shape.dim]  # the batch is already fixed here
    shown = [batch if i == 0 and not isinstance(d, int) else d for i, d in enumerate(shown or dims)]
    return f"--input-shape {inp.name}={_dims_text(shown)}"


def parse_input_shape(text: str) -> tuple[str, list[int]]:
    """``NAME=D0,D1,...`` (the command line's ``--input-shape``) → (name, dims)."""
    name, sep, dims = text.rpartition("=")
    try:
        values = [int(d) for d in dims.replace("x", ",").split(",") if d.strip()]
    except ValueError:
        values = []
    if not sep or not name or not values or any(v < 1 for v in values):
        raise InputError(f"--input-shape {text!r}: write NAME=D0,D1,... with positive integers, e.g. input=1,3,224,224")
    return name, values


def parse_input_value(text: str) -> tuple[str, Any]:
    """``NAME=VALUE`` or ``NAME=FILE.npy`` (the command line's ``--input-value``) → (name, value).

    A value is a number or a comma-separated list of numbers; a ``.npy`` file is read without pickles.
    """
    name, sep, raw = text.rpartition("=")
    if not sep or not name or not raw.strip():
        raise InputError(f"--input-value {text!r}: write NAME=VALUE (a number or list a,b,c) or NAME=FILE.npy")
    raw = raw.strip()
    if raw.endswith(".npy"):
        p = Path(raw)
        if not p.is_file():
            raise InputError(f"--input-value {name}: {p}: no such file")
        try:
            return name, np.load(p, allow_pickle=False)
        except ValueError as exc:
            raise InputError(f"--input-value {name}: {p} is not a .npy array ({exc})") from exc
    try:
        numbers = [float(v) for v in raw.split(",")]
    except ValueError:
        raise InputError(f"--input-value {text!r}: {raw!r} is not a number, a list a,b,c or a .npy file") from None
    array = np.asarray(numbers if len(numbers) > 1 else numbers[0])
    return name, array


def _graph_input(proto: onnx.ModelProto, name: str, option: str) -> onnx.ValueInfoProto:
    for inp in proto.graph.input:
        if inp.name == name:
            return inp
    names = ", ".join(repr(i.name) for i in proto.graph.input) or "none"
    raise InputError(f"{option} names input {name!r}, which the model does not have (its inputs: {names})")


def _freeze_inputs(proto: onnx.ModelProto, values: Mapping[str, Any]) -> None:
    """Replace the named graph inputs by initializers holding the given values (cast to the input's type)."""
    for name, value in values.items():
        inp = _graph_input(proto, name, "--input-value")
        elem = inp.type.tensor_type.elem_type
        try:
            dtype = helper.tensor_dtype_to_np_dtype(elem)
        except (KeyError, ValueError):
            raise InputError(f"--input-value {name}: the input's element type {elem} cannot hold a constant") from None
        array = np.asarray(value)
        if array.dtype.kind not in "biuf":
            raise InputError(f"--input-value {name}: the value has dtype {array.dtype}; give numbers")
        dims = _declared_dims(inp)
        if dims is not None:
            if array.size == 1 and len(dims) != array.ndim:
                shape = [d if isinstance(d, int) else 1 for d in dims]
                if any(d != 1 for d in shape):
                    raise InputError(
                        f"--input-value {name}: one number for an input of shape [{_dims_text(dims)}]; "
                        "give a .npy file with the full array"
                    )
                array = array.reshape(shape)
            elif len(dims) != array.ndim or any(isinstance(d, int) and d != s for d, s in zip(dims, array.shape)):
                raise InputError(
                    f"--input-value {name}: the value has shape [{_dims_text(array.shape)}] but the input is "
                    f"[{_dims_text(dims)}]"
                )
        proto.graph.initializer.append(numpy_helper.from_array(array.astype(dtype), name=name))
        proto.graph.input.remove(inp)
        logger.info("input %s frozen to a constant of shape %s", name, list(array.shape))


def _set_input_shapes(proto: onnx.ModelProto, shapes: Mapping[str, Sequence[int]]) -> None:
    """Give the named graph inputs the user's static shapes (declared static dimensions must agree)."""
    for name, given in shapes.items():
        inp = _graph_input(proto, name, "--input-shape")
        given = [int(d) for d in given]
        if any(d < 1 for d in given):
            raise InputError(f"--input-shape {name}: dimensions must be positive (got {_dims_text(given)})")
        dims = _declared_dims(inp)
        if dims is not None:
            if len(dims) != len(given):
                raise InputError(
                    f"--input-shape {name}={_dims_text(given)} has {len(given)} dimensions but the input has "
                    f"{len(dims)} ([{_dims_text(dims)}])"
                )
            clash = [(i, d, g) for i, (d, g) in enumerate(zip(dims, given)) if isinstance(d, int) and d != g]
            if clash:
                i, d, g = clash[0]
                raise InputError(
                    f"--input-shape {name}: dimension {i} is fixed to {d} in the model, not {g} "
                    f"(the model's shape: [{_dims_text(dims)}])"
                )
        shape = inp.type.tensor_type.shape
        shape.ClearField("dim")
        for d in given:
            shape.dim.add().dim_value = d


def _clear_negative_dims(proto: onnx.ModelProto) -> None:
    """Some exporters (Paddle's) write unknown dimensions as ``dim_value: -1`` in value_info and outputs: to strict
    shape inference that is a fixed size that then "differs" from the inferred one. Make them unknown. Graph
    inputs keep theirs: a negative input dimension is dynamic and handled like any other."""
    for group in (proto.graph.value_info, proto.graph.output):
        for v in group:
            if not v.type.HasField("tensor_type") or not v.type.tensor_type.HasField("shape"):
                continue
            for d in v.type.tensor_type.shape.dim:
                if d.HasField("dim_value") and d.dim_value < 0:
                    d.Clear()


def _batch_symbols(proto: onnx.ModelProto) -> set[str]:
    """Names of the symbolic dimensions that stand first in some input: the batch."""
    initializers = {t.name for t in proto.graph.initializer}
    return {
        i.type.tensor_type.shape.dim[0].dim_param
        for i in proto.graph.input
        if i.name not in initializers and i.type.HasField("tensor_type") and len(i.type.tensor_type.shape.dim)
        and i.type.tensor_type.shape.dim[0].dim_param
    }


def _declared_batch_axes(proto: onnx.ModelProto, batch_symbols: set[str]) -> dict[str, int]:
    """Where each input declares the batch: the first dimension named by a batch symbol (a state declared
    [2, batch, 128] has it on axis 1), so that an --input-shape fixing it to 1 keeps it as the batch axis."""
    axes = {}
    for inp in proto.graph.input:
        if not inp.type.HasField("tensor_type"):
            continue
        dims = list(inp.type.tensor_type.shape.dim)
        named = [i for i, d in enumerate(dims) if d.dim_param and d.dim_param in batch_symbols]
        unknown = [i for i, d in enumerate(dims) if not (d.HasField("dim_value") and d.dim_value > 0)]
        if named:
            axes[inp.name] = named[0]
        elif len(unknown) == 1:  # exporters that leave the batch unnamed ([2, ?, 128]): the one dynamic dimension
            axes[inp.name] = unknown[0]
    return axes


def _has_dynamic_batch(proto: onnx.ModelProto) -> bool:
    """True when some graph input's first dimension is dynamic in the file (the exporter left the batch free)."""
    initializers = {t.name for t in proto.graph.initializer}
    for inp in proto.graph.input:
        dims = inp.type.tensor_type.shape.dim if inp.type.HasField("tensor_type") else []
        if inp.name not in initializers and len(dims) and not (dims[0].HasField("dim_value") and dims[0].dim_value > 0):
            return True
    return False


def _fix_input_shapes(proto: onnx.ModelProto, batch: int, batch_symbols: set[str]) -> dict[str, int]:
    """Dimension 0 of every input, and any dimension named like one (a state input [layers, batch, hidden]),
    is the batch; every other unknown dimension is an error naming the option that fixes it. Returns each
    input's batch axis (0 unless the batch symbol stands elsewhere)."""
    initializers = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers and i.type.HasField("tensor_type")]
    axes: dict[str, int] = {}
    for inp in inputs:
        shape = inp.type.tensor_type.shape
        for i, dim in enumerate(shape.dim):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                continue
            if i == 0 or (dim.dim_param and dim.dim_param in batch_symbols):
                axes.setdefault(inp.name, i)
                dim.Clear()
                dim.dim_value = batch
                continue
            label = dim.dim_param or "?"
            raise ModelError(
                f"input '{inp.name}' has a dynamic dimension {i} ({label!r}); cimc compiles for fixed shapes: "
                f"fix it with {_suggested_shape(inp, batch)} (replace {label!r} by its size; input_shapes= in the API)"
            )
    return {i.name: axes.get(i.name, 0) for i in inputs}


def load_model(
    path: str | os.PathLike[str],
    batch: int = 1,
    *,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    input_values: Mapping[str, Any] | None = None,
) -> ir.Model:
    """Load an ONNX model as an onnx-ir model with fixed input shapes and inferred intermediate shapes.

    ``input_shapes``: {input name: static shape} for inputs with dynamic dimensions (the batch dimension of the
    others is fixed to ``batch``). ``input_values``: {input name: array or number} freezes inputs to constants
    (constant folding then removes what depends on them, e.g. an ``If`` on a sample-rate input).
    """
    if batch < 1:
        raise InputError(f"batch size must be at least 1 (got {batch})")
    proto = load_onnx(path, check_shapes=False)
    opset = _default_opset(proto)
    newest = onnx.defs.onnx_opset_version()
    if opset is None or not MIN_OPSET <= opset <= newest:
        raise ModelError(
            f"{Path(path).name}: opset {opset} is outside the supported range {MIN_OPSET}..{newest}; "
            "re-export the model with a supported opset"
        )
    if opset < CANONICAL_OPSET:
        try:
            proto = version_converter.convert_version(proto, CANONICAL_OPSET)
        except Exception as exc:  # the converter raises bare RuntimeErrors
            raise ModelError(
                f"{Path(path).name}: cannot convert opset {opset} to {CANONICAL_OPSET} ({str(exc).splitlines()[0]}); "
                "re-export the model with opset 13 or newer"
            ) from exc
    # IR v3 models list initializers as graph inputs; those are weights, not inputs to fix.
    initializer_names = {t.name for t in proto.graph.initializer}
    keep = [i for i in proto.graph.input if i.name not in initializer_names]
    del proto.graph.input[:]
    proto.graph.input.extend(keep)
    proto.ir_version = max(proto.ir_version, 4)
    _clear_negative_dims(proto)
    batch_symbols = _batch_symbols(proto)
    if input_values:
        _freeze_inputs(proto, input_values)
    declared_axes = _declared_batch_axes(proto, batch_symbols)  # before --input-shape makes every dim static
    if input_shapes:
        _set_input_shapes(proto, input_shapes)
    dynamic_batch = _has_dynamic_batch(proto)
    batch_axes = {**_fix_input_shapes(proto, batch, batch_symbols),
                  **{n: a for n, a in declared_axes.items()
                     if n in (input_shapes or {}) and int(list(input_shapes[n])[a]) == batch}}
    validate.validate_model(proto, Path(path).name)  # with every input's shape now fixed
    try:
        proto = shape_inference.infer_shapes(proto, strict_mode=True, data_prop=True)
    except Exception as exc:
        raise ModelError(
            f"{Path(path).name}: ONNX shape inference failed ({str(exc).strip().splitlines()[0]}); "
            "the graph is inconsistent: re-export it"
        ) from exc
    model = ir.from_proto(proto)
    renamed = name_nodes(model)
    if renamed:
        logger.info("named %d unnamed or duplicate-named nodes", renamed)
    model.graph.meta["cimc.batch"] = batch
    model.graph.meta["cimc.dynamic_batch"] = dynamic_batch  # the file leaves the batch free (canonicalize.py)
    if any(batch_axes.values()):
        model.metadata_props["cimc.batch_axes"] = json.dumps(batch_axes)
    if input_shapes or input_values:
        model.metadata_props["cimc.fixed_inputs"] = json.dumps(
            {"shapes": {k: [int(d) for d in v] for k, v in (input_shapes or {}).items()},
             "values": sorted(input_values or {})}
        )
    return model


def save_model(model: ir.Model, path: str | os.PathLike[str]) -> None:
    """Write the model atomically (to a temporary file in the same folder, then rename)."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp")
    ir.save(model, tmp)
    os.replace(tmp, p)
