"""ONNX import: from a file on disk to a validated, shape-inferred onnx-ir model.

The steps, each of which either succeeds or raises a one-line :class:`~cimc.errors.CimcError`:

1. read the file (missing path, a directory, an empty or truncated file, not a protobuf → InputError);
2. external data is loaded only from inside the model's own folder (no absolute paths, no ``..``);
3. the default-domain opset must be between 9 and the newest onnx knows; models older than opset 13 are
   converted to 13 so every op has one set of semantics;
4. the batch dimension of every graph input is fixed (default 1); any other unknown dimension is an error
   that names the input;
5. ONNX shape inference (strict), then conversion to onnx-ir.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError
from onnx import shape_inference, version_converter

from cimc import validate
from cimc.errors import InputError, ModelError

__all__ = ["MIN_OPSET", "CANONICAL_OPSET", "load_onnx", "load_model", "save_model"]

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


def load_onnx(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Read an ONNX file (with its external data) and check it, raising InputError on anything malformed."""
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
    validate.validate_model(proto, p.name)
    return proto


def _fix_input_shapes(proto: onnx.ModelProto, batch: int) -> None:
    initializers = {t.name for t in proto.graph.initializer}
    for inp in proto.graph.input:
        if inp.name in initializers or not inp.type.HasField("tensor_type"):
            continue
        shape = inp.type.tensor_type.shape
        for i, dim in enumerate(shape.dim):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                continue
            if i == 0:
                dim.Clear()
                dim.dim_value = batch
                continue
            label = dim.dim_param or "?"
            raise ModelError(
                f"input '{inp.name}' has a dynamic dimension {i} ({label!r}); cimc compiles for fixed shapes: "
                "re-export the model with a fixed input size (only the batch dimension may be dynamic)"
            )


def load_model(path: str | os.PathLike[str], batch: int = 1) -> ir.Model:
    """Load an ONNX model as an onnx-ir model with fixed input shapes and inferred intermediate shapes."""
    if batch < 1:
        raise InputError(f"batch size must be at least 1 (got {batch})")
    proto = load_onnx(path)
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
    _fix_input_shapes(proto, batch)
    try:
        proto = shape_inference.infer_shapes(proto, strict_mode=True, data_prop=True)
    except Exception as exc:
        raise ModelError(
            f"{Path(path).name}: ONNX shape inference failed ({str(exc).strip().splitlines()[0]}); "
            "the graph is inconsistent: re-export it"
        ) from exc
    model = ir.from_proto(proto)
    model.graph.meta["cimc.batch"] = batch
    return model


def save_model(model: ir.Model, path: str | os.PathLike[str]) -> None:
    """Write the model atomically (to a temporary file in the same folder, then rename)."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp")
    ir.save(model, tmp)
    os.replace(tmp, p)
