"""Fuzzing harness: hostile and broken models and data files through every cimc command.

Each case runs in a worker process (cimc imported once) with a per-step time limit; a step that runs past
it, or kills the worker, is recorded as a hang or crash and the worker is restarted. Model cases:

* structure-aware mutations of small seed models built in code (attributes, dtypes, dims, names, graph
  shape, op types, generator ops with huge sizes, hostile weight values), made with the onnx API;
* byte-level mutations of the serialized seeds (flips, truncation, insertion, splices);
* valid variants (seeds with new random weights) as controls.

Each model goes through onnxruntime (the reference), ``cimc inspect``, ``cimc compile`` on the ideal,
aon-cim (with calibration) and hermes presets, ``cimc run`` on the ideal compile (compared with
onnxruntime), ``cimc export`` + ``cimc verify`` of the aon-cim compile. Data cases: broken ``.npz``/``.npy``
files through ``compile --calib``, ``simulate --data`` and ``run --input``.

Outcomes of a cimc step: ``ok``, ``refused`` (exit 2, one line), and the failures ``traceback``,
``multiline`` (exit 2 but more than one line), ``hang``, ``crash``, ``exit-N``. A model that onnxruntime
runs and cimc runs too must agree (``differ`` is a failure: an answer that is wrong).

    nice -n 10 python benchmarks/fuzz.py --models 1000 --data 100 --seed 0 --time-limit 40m

prints the table ``docs/reliability.md`` records and writes failing cases to ``--keep DIR`` (default
``~/.cache/cimc/fuzz``) for reproduction.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import multiprocessing as mp
import os
import random
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper, numpy_helper

__all__ = ["SEEDS", "MUTATORS", "DATA_BREAKERS", "Fuzzer", "main", "make_seed", "mutate_model", "mutate_bytes"]

logger = logging.getLogger(__name__)

FAILURES = ("traceback", "multiline", "hang", "crash", "differ")
WORKER_BUDGET = "1G"  # cimc's memory budget in the worker: refusals come long before the machine runs out
RTOL, ATOL = 1e-3, 1e-4  # cimc (ideal target) vs onnxruntime, atol relative to max |reference|


# ------------------------------------------------------------------------------------------ seed models
def _w(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return (rng.normal(size=shape) / np.sqrt(max(1, int(np.prod(shape[1:]))))).astype(np.float32)


def _model(nodes: list[onnx.NodeProto], x: tuple[str, list[int | str]], inits: dict[str, np.ndarray],
           opset: int = 13) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "seed", [helper.make_tensor_value_info(x[0], T.FLOAT, x[1])],
                              [helper.make_tensor_value_info("y", T.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    inferred = onnx.shape_inference.infer_shapes(model)
    model.graph.output[0].CopyFrom(inferred.graph.output[0])
    return model


def seed_mlp(rng: np.random.Generator, batch: int | str = 1) -> onnx.ModelProto:
    n = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
         helper.make_node("Relu", ["h"], ["a"], name="relu"),
         helper.make_node("Gemm", ["a", "w2", "b2"], ["z"], name="fc2"),
         helper.make_node("Softmax", ["z"], ["y"], name="softmax", axis=-1)]
    return _model(n, ("x", [batch, 16]), {"w1": _w(rng, 12, 16), "b1": _w(rng, 12), "w2": _w(rng, 12, 5),
                                          "b2": _w(rng, 5)})


def seed_cnn(rng: np.random.Generator) -> onnx.ModelProto:
    n = [helper.make_node("Conv", ["x", "w1", "b1"], ["c"], name="conv", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
         helper.make_node("BatchNormalization", ["c", "g", "be", "mu", "var"], ["bn"], name="bn"),
         helper.make_node("Relu", ["bn"], ["r"], name="relu"),
         helper.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
         helper.make_node("Flatten", ["p"], ["f"], name="flat", axis=1),
         helper.make_node("Gemm", ["f", "w2", "b2"], ["y"], name="fc", transB=1)]
    return _model(n, ("x", [1, 1, 8, 8]), {
        "w1": _w(rng, 4, 1, 3, 3), "b1": _w(rng, 4), "g": (1 + 0.1 * rng.normal(size=4)).astype(np.float32),
        "be": _w(rng, 4), "mu": _w(rng, 4), "var": (1 + rng.random(4)).astype(np.float32),
        "w2": _w(rng, 3, 64), "b2": _w(rng, 3)})


def seed_conv1d(rng: np.random.Generator) -> onnx.ModelProto:
    n = [helper.make_node("Conv", ["x", "w1"], ["c"], name="conv1d", strides=[2], dilations=[1]),
         helper.make_node("Relu", ["c"], ["r"], name="relu"),
         helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
         helper.make_node("Flatten", ["g"], ["f"], name="flat"),
         helper.make_node("MatMul", ["f", "w2"], ["m"], name="mm"),
         helper.make_node("Add", ["m", "b2"], ["y"], name="add")]
    return _model(n, ("x", [1, 2, 16]), {"w1": _w(rng, 6, 2, 3), "w2": _w(rng, 6, 4), "b2": _w(rng, 4)})


def seed_grouped(rng: np.random.Generator) -> onnx.ModelProto:
    n = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="grouped", group=2, pads=[1, 1, 1, 1]),
         helper.make_node("Conv", ["c1", "w2"], ["c2"], name="depthwise", group=4, pads=[1, 1, 1, 1]),
         helper.make_node("Add", ["c1", "c2"], ["s"], name="residual"),
         helper.make_node("AveragePool", ["s"], ["p"], name="avg", kernel_shape=[3, 3], strides=[3, 3]),
         helper.make_node("Reshape", ["p", "shape"], ["f"], name="reshape"),
         helper.make_node("Gemm", ["f", "w3"], ["y"], name="fc")]
    return _model(n, ("x", [1, 4, 6, 6]), {"w1": _w(rng, 4, 2, 3, 3), "w2": _w(rng, 4, 1, 3, 3),
                                           "shape": np.array([1, -1], np.int64), "w3": _w(rng, 16, 3)})


def seed_concat(rng: np.random.Generator) -> onnx.ModelProto:
    n = [helper.make_node("Conv", ["x", "wa"], ["a"], name="branch_a"),
         helper.make_node("Conv", ["x", "wb"], ["b"], name="branch_b", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
         helper.make_node("Concat", ["a", "b"], ["c"], name="concat", axis=1),
         helper.make_node("Sigmoid", ["c"], ["s"], name="sigmoid"),
         helper.make_node("ReduceMean", ["s"], ["m"], name="mean", axes=[2, 3], keepdims=0),
         helper.make_node("MatMul", ["m", "w"], ["y"], name="mm")]
    return _model(n, ("x", [1, 3, 5, 5]), {"wa": _w(rng, 2, 3, 1, 1), "wb": _w(rng, 3, 3, 3, 3), "w": _w(rng, 5, 2)})


SEEDS: dict[str, Callable[[np.random.Generator], onnx.ModelProto]] = {
    "mlp": seed_mlp, "mlp_dynamic": lambda r: seed_mlp(r, "N"), "cnn": seed_cnn, "conv1d": seed_conv1d,
    "grouped": seed_grouped, "concat": seed_concat,
}


def make_seed(name: str, seed: int) -> onnx.ModelProto:
    return SEEDS[name](np.random.default_rng(seed))


# ------------------------------------------------------------------------------------------ mutations
_INTS = [-(1 << 31), -2, -1, 0, 1, 2, 3, 5, 7, 64, 1000, 1 << 20, 1 << 40]
_ATTRS = ["group", "transA", "transB", "axis", "kernel_shape", "strides", "pads", "dilations", "keepdims", "alpha",
          "ceil_mode", "count_include_pad", "axes", "to", "epsilon", "auto_pad"]


def _pick_int(rng: random.Random, current: int | None = None) -> int:
    if current is not None and rng.random() < 0.4:
        return current + rng.choice([-2, -1, 1, 2])
    return rng.choice(_INTS)


def mut_attribute(m: onnx.ModelProto, rng: random.Random) -> str:
    node = rng.choice(m.graph.node)
    ints = [a for a in node.attribute if a.type in (onnx.AttributeProto.INT, onnx.AttributeProto.INTS)]
    if ints and rng.random() < 0.7:
        a = rng.choice(ints)
        if a.type == onnx.AttributeProto.INT:
            a.i = _pick_int(rng, a.i)
        elif a.ints:
            k = rng.randrange(len(a.ints))
            a.ints[k] = _pick_int(rng, a.ints[k])
            if rng.random() < 0.2:
                a.ints.append(_pick_int(rng))
        return f"attr {node.op_type}.{a.name}"
    name = rng.choice(_ATTRS)
    del_existing = [i for i, a in enumerate(node.attribute) if a.name == name]
    for i in reversed(del_existing):
        del node.attribute[i]
    if name in ("kernel_shape", "strides", "pads", "dilations", "axes"):
        node.attribute.append(helper.make_attribute(name, [_pick_int(rng) for _ in range(rng.choice([1, 2, 4]))]))
    elif name in ("alpha", "epsilon"):
        node.attribute.append(helper.make_attribute(name, rng.choice([0.0, -1.0, 1e30, float("nan"), 2.0])))
    elif name == "auto_pad":
        node.attribute.append(helper.make_attribute(name, rng.choice(["SAME_UPPER", "VALID", "BOGUS", ""])))
    else:
        node.attribute.append(helper.make_attribute(name, _pick_int(rng)))
    return f"attr+ {node.op_type}.{name}"


def mut_dtype(m: onnx.ModelProto, rng: random.Random) -> str:
    t = rng.choice(list(m.graph.initializer))
    code = rng.choice([c for c in T.DataType.values() if c != t.data_type] + [99, 1000])
    t.data_type = code
    if rng.random() < 0.5 and code in (T.DOUBLE, T.INT64, T.COMPLEX64):
        t.raw_data = t.raw_data * 2  # bytes consistent with the new type
    elif rng.random() < 0.3 and code in (T.FLOAT16, T.INT16, T.BFLOAT16):
        t.raw_data = t.raw_data[: len(t.raw_data) // 2]
    return f"dtype {T.DataType.Name(code) if code in T.DataType.values() else code}"


def mut_dims(m: onnx.ModelProto, rng: random.Random) -> str:
    if rng.random() < 0.5:
        t = rng.choice(list(m.graph.initializer))
        if t.dims:
            k = rng.randrange(len(t.dims))
            t.dims[k] = rng.choice([0, 1, -1, t.dims[k] + 1, t.dims[k] * 2, 1 << 40])
        else:
            t.dims.append(rng.choice([0, 2]))
        return "dims initializer"
    inp = m.graph.input[0]
    dims = inp.type.tensor_type.shape.dim
    k = rng.randrange(len(dims))
    choice = rng.choice([0, 1, 2, 3, 1000, 1 << 31, "sym", -1])
    dims[k].Clear()
    if choice == "sym":
        dims[k].dim_param = "d"
    else:
        dims[k].dim_value = choice
    return "dims input"


def mut_raw(m: onnx.ModelProto, rng: random.Random) -> str:
    t = rng.choice(list(m.graph.initializer))
    op = rng.choice(["truncate", "extend", "typed"])
    if op == "truncate":
        t.raw_data = t.raw_data[: rng.randrange(max(1, len(t.raw_data)))]
    elif op == "extend":
        t.raw_data = t.raw_data + bytes(rng.randrange(1, 16))
    else:
        values = numpy_helper.to_array(t).reshape(-1).tolist() if t.data_type == T.FLOAT else []
        t.ClearField("raw_data")
        t.float_data.extend(values[: max(0, len(values) + rng.choice([-1, 0, 1]))])
    return f"raw {op}"


def mut_values(m: onnx.ModelProto, rng: random.Random) -> str:
    floats = [t for t in m.graph.initializer if t.data_type == T.FLOAT]
    t = rng.choice(floats)
    a = numpy_helper.to_array(t).copy()
    kind = rng.choice(["denormal", "nan", "inf", "huge", "zero", "tiny_one"])
    if kind == "denormal":
        a[...] = np.float32(1e-43) * np.sign(a + 1e-9)
    elif kind == "nan":
        a.reshape(-1)[0] = np.nan
    elif kind == "inf":
        a.reshape(-1)[0] = np.inf
    elif kind == "huge":
        a *= np.float32(1e37)
    elif kind == "zero":
        a[...] = 0
    else:
        a[...] = 0
        a.reshape(-1)[0] = np.float32(1e-40)
    t.CopyFrom(numpy_helper.from_array(a.astype(np.float32), t.name))
    return f"values {kind}"


def mut_names(m: onnx.ModelProto, rng: random.Random) -> str:
    g = m.graph
    op = rng.choice(["dup_node_name", "empty_node_name", "rename_value", "dup_output", "non_utf8", "empty_value"])
    node = rng.choice(g.node)
    if op == "dup_node_name":
        for n in g.node:
            n.name = "same"
    elif op == "empty_node_name":
        for n in g.node:
            n.name = ""
    elif op == "rename_value" and node.input:
        node.input[rng.randrange(len(node.input))] = "nowhere"
    elif op == "dup_output":
        other = rng.choice(g.node)
        if other is not node and node.output:
            other.output[0] = node.output[0]
    elif op == "non_utf8":
        node.name = "n_NONUTF8"  # its bytes become invalid UTF-8 once serialized (_serialize)
    elif op == "empty_value" and node.input:
        node.input[0] = ""
    return f"names {op}"


def _add_output(m: onnx.ModelProto, name: str) -> None:
    """A graph output typed by (lenient) shape inference, as an exporter writes it; rank-1 unknown if it fails."""
    out = helper.make_tensor_value_info(name, T.FLOAT, None)
    try:
        inferred = onnx.shape_inference.infer_shapes(m)
        known = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
        if name in known and known[name].type.tensor_type.HasField("shape"):
            out.CopyFrom(known[name])
    except Exception:  # noqa: BLE001 - a broken mutant: keep the fallback type
        pass
    if not out.type.tensor_type.HasField("shape"):
        out.type.tensor_type.shape.dim.add().dim_param = "n"
    m.graph.output.append(out)


def mut_graph(m: onnx.ModelProto, rng: random.Random) -> str:
    g = m.graph
    op = rng.choice(["delete_node", "duplicate_node", "reverse", "drop_output", "extra_output", "swap_inputs",
                     "no_nodes", "self_loop"])
    nodes = list(g.node)
    if op == "delete_node" and len(nodes) > 1:
        del g.node[rng.randrange(len(nodes))]
    elif op == "duplicate_node":
        g.node.append(nodes[rng.randrange(len(nodes))])
    elif op == "reverse":
        del g.node[:]
        g.node.extend(reversed(nodes))
    elif op == "drop_output":
        del g.output[:]
    elif op == "extra_output":
        _add_output(m, rng.choice(nodes).output[0])
    elif op == "swap_inputs":
        n = rng.choice(nodes)
        if len(n.input) >= 2:
            n.input[0], n.input[1] = n.input[1], n.input[0]
    elif op == "no_nodes":
        del g.node[:]
    elif op == "self_loop":
        n = rng.choice(nodes)
        n.input[0] = n.output[0]
    return f"graph {op}"


_OP_SWAPS = {"Relu": ["Sigmoid", "Tanh", "Abs", "Softmax", "Exp", "Log", "Sqrt", "Reciprocal", "Identity", "Neg",
                      "Floor", "HardSwish", "Erf"],
             "Conv": ["ConvTranspose", "MaxPool"], "MaxPool": ["AveragePool", "LpPool", "GlobalMaxPool"],
             "Gemm": ["MatMul", "Add"], "MatMul": ["Gemm", "Mul", "Sub", "Div"], "Add": ["Mul", "Sub", "Div", "Max"],
             "Flatten": ["Identity", "Squeeze"], "Softmax": ["LogSoftmax", "Hardmax"], "Sigmoid": ["Relu", "Tanh"]}


def mut_op(m: onnx.ModelProto, rng: random.Random) -> str:
    candidates = [n for n in m.graph.node if n.op_type in _OP_SWAPS]
    node = rng.choice(candidates or list(m.graph.node))
    new = rng.choice(_OP_SWAPS.get(node.op_type, ["Relu", "NoSuchOp"]))
    node.op_type = new
    if rng.random() < 0.1:
        node.domain = "com.example"
    return f"op -> {new}"


def mut_opset(m: onnx.ModelProto, rng: random.Random) -> str:
    m.opset_import[0].version = rng.choice([1, 7, 9, 11, 12, 14, 17, 21, 99])
    return f"opset {m.opset_import[0].version}"


def mut_generator(m: onnx.ModelProto, rng: random.Random) -> str:
    """Insert ConstantOfShape/Range/Expand/Tile/Pad/Resize with a (often huge) constant size, added to x."""
    g = m.graph
    x = g.input[0].name
    big = rng.choice([2, 1000, 1 << 20, 1 << 31, 1 << 40])
    op = rng.choice(["ConstantOfShape", "Range", "Expand", "Tile", "Pad", "Resize"])
    consts: dict[str, np.ndarray] = {}
    if op == "ConstantOfShape":
        consts["gs"] = np.array([big, big], np.int64)
        nodes = [helper.make_node("ConstantOfShape", ["gs"], ["gen"], name="gen")]
    elif op == "Range":
        consts.update(ga=np.array(0, np.float32), gb=np.array(float(big), np.float32), gc=np.array(1, np.float32))
        nodes = [helper.make_node("Range", ["ga", "gb", "gc"], ["gen"], name="gen")]
    elif op == "Expand":
        consts["gs"] = np.array([big, 1], np.int64)
        nodes = [helper.make_node("Expand", [x, "gs"], ["gen"], name="gen")]
    elif op == "Tile":
        rank = len(g.input[0].type.tensor_type.shape.dim)
        consts["gs"] = np.array([big] + [1] * (rank - 1), np.int64)
        nodes = [helper.make_node("Tile", [x, "gs"], ["gen"], name="gen")]
    elif op == "Pad":
        rank = len(g.input[0].type.tensor_type.shape.dim)
        consts["gs"] = np.array([0] * rank + [0] * (rank - 1) + [big], np.int64)
        nodes = [helper.make_node("Pad", [x, "gs"], ["gen"], name="gen")]
    else:
        rank = len(g.input[0].type.tensor_type.shape.dim)
        consts["gs"] = np.array([1.0] * (rank - 1) + [float(big)], np.float32)
        nodes = [helper.make_node("Resize", [x, "", "gs"], ["gen"], name="gen")]
    for k, v in consts.items():
        g.initializer.append(numpy_helper.from_array(v, k))
    g.node.extend(nodes)
    _add_output(m, "gen")
    return f"generator {op} {big}"


MUTATORS: dict[str, Callable[[onnx.ModelProto, random.Random], str]] = {
    "attribute": mut_attribute, "dtype": mut_dtype, "dims": mut_dims, "raw_data": mut_raw, "values": mut_values,
    "names": mut_names, "graph": mut_graph, "op_type": mut_op, "opset": mut_opset, "generator": mut_generator,
}


def _serialize(m: onnx.ModelProto) -> bytes:
    data = m.SerializeToString()
    return data.replace(b"NONUTF8", b"\xff\xfe\xfd\xfc\xfb\xfa\xf9")  # same length: framing intact


def mutate_model(seed_name: str, rng: random.Random, exclude: tuple[str, ...] = ()) -> tuple[bytes, str]:
    """One structure-aware mutant of a seed (1-3 mutations); returns (bytes, description).

    ``exclude``: mutations whose description contains one of these strings are drawn again.
    """
    m = make_seed(seed_name, rng.randrange(1 << 30))
    done = []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        for _attempt in range(20):
            kind = rng.choice(list(MUTATORS))
            trial = onnx.ModelProto()
            trial.CopyFrom(m)
            try:
                what = MUTATORS[kind](trial, rng)
            except (IndexError, ValueError, TypeError) as exc:  # a mutation that does not apply to this seed
                what = f"{kind} skipped ({type(exc).__name__})"
            if not any(x in what for x in exclude):
                m = trial
                done.append(what)
                break
    try:
        return _serialize(m), "; ".join(done)
    except Exception as exc:  # noqa: BLE001 - protobuf refuses some values (e.g. a surrogate in a str field)
        return make_seed(seed_name, 0).SerializeToString(), f"unserializable mutant ({type(exc).__name__})"


def mutate_bytes(seed_name: str, rng: random.Random) -> tuple[bytes, str]:
    data = bytearray(make_seed(seed_name, rng.randrange(1 << 30)).SerializeToString())
    op = rng.choice(["flip", "flips", "truncate", "insert", "splice", "zero_run"])
    if op == "flip":
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif op == "flips":
        for _ in range(rng.randrange(2, 20)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif op == "truncate":
        data = data[: rng.randrange(len(data))]
    elif op == "insert":
        at = rng.randrange(len(data))
        data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 8)))
    elif op == "splice":
        other = make_seed(rng.choice(list(SEEDS)), 1).SerializeToString()
        cut = rng.randrange(len(data))
        data = data[:cut] + other[rng.randrange(len(other)):]
    else:
        at = rng.randrange(len(data))
        data[at : at + 16] = bytes(16)
    return bytes(data), f"bytes {op}"


# ------------------------------------------------------------------------------------------ broken data files
def _npz_bytes(**arrays: Any) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _npy_bytes(array: Any, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=allow_pickle)
    return buf.getvalue()


def _huge_header(shape: tuple[int, ...], member: bool) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": shape})
    body = buf.getvalue() + bytes(64)
    if not member:
        return body
    import zipfile

    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("x.npy", body)
    return out.getvalue()


def _compressed_bomb() -> bytes:
    import zipfile

    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as z:
        with z.open("x.npy", "w", force_zip64=True) as f:
            buf = io.BytesIO()
            np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False,
                                                       "shape": (1 << 16, 1, 8, 8 * 128)})
            f.write(buf.getvalue())
            chunk = bytes(1 << 20)
            for _ in range(64):  # 64 MiB of zeros, ~64 KB compressed: the header says 2 GiB
                f.write(chunk)
    return out.getvalue()


def data_breakers(shape: tuple[int, ...], classes: int) -> dict[str, Callable[[random.Random], tuple[bytes, str]]]:
    """Broken data files for a model taking ``shape`` (without the sample axis) with ``classes`` outputs."""
    def good(n: int, rng: random.Random) -> np.ndarray:
        return np.random.default_rng(rng.randrange(1 << 30)).normal(size=(n, *shape)).astype(np.float32)

    def labels(n: int, rng: random.Random) -> np.ndarray:
        return np.array([rng.randrange(classes) for _ in range(n)], np.int64)

    return {
        "valid": lambda r: (_npz_bytes(x=good(8, r), y=labels(8, r)), "npz"),
        "truncated": lambda r: (_npz_bytes(x=good(8, r), y=labels(8, r))[: r.randrange(10, 400)], "npz"),
        "random_bytes": lambda r: (bytes(r.randrange(256) for _ in range(r.randrange(0, 300))), "npz"),
        "no_x": lambda r: (_npz_bytes(z=good(4, r)), "npz"),
        "pickled": lambda r: (_npy_bytes(np.array([{"a": 1}], dtype=object), True), "npy"),
        "pickled_npz": lambda r: (_npz_bytes(x=np.array([{"a": 1}] * 4, dtype=object)), "npz"),
        "huge_header": lambda r: (_huge_header((1 << 28, 1024), True), "npz"),
        "huge_header_npy": lambda r: (_huge_header((1 << 28, 1024), False), "npy"),
        "compressed_bomb": lambda r: (_compressed_bomb(), "npz"),
        "wrong_shape": lambda r: (_npz_bytes(x=good(4, r).reshape(4, -1)[:, :-1], y=labels(4, r)), "npz"),
        "flat": lambda r: (_npy_bytes(good(4, r).reshape(-1)), "npy"),
        "scalar": lambda r: (_npy_bytes(np.float32(1.0)), "npy"),
        "empty": lambda r: (_npz_bytes(x=np.zeros((0, *shape), np.float32), y=np.zeros(0, np.int64)), "npz"),
        "strings": lambda r: (_npz_bytes(x=np.array([["a"] * 3] * 4), y=labels(4, r)), "npz"),
        "nan": lambda r: (_npz_bytes(x=np.full((4, *shape), np.nan, np.float32), y=labels(4, r)), "npz"),
        "inf_one": lambda r: (_npz_bytes(x=np.where(np.arange(4 * int(np.prod(shape))).reshape(4, *shape) == 0,
                                                    np.inf, 1.0).astype(np.float32), y=labels(4, r)), "npz"),
        "labels_float": lambda r: (_npz_bytes(x=good(4, r), y=np.ones(4, np.float32)), "npz"),
        "labels_out_of_range": lambda r: (_npz_bytes(x=good(4, r), y=np.array([0, classes, -1, 99])), "npz"),
        "labels_count": lambda r: (_npz_bytes(x=good(4, r), y=labels(3, r)), "npz"),
        "labels_2d": lambda r: (_npz_bytes(x=good(4, r), y=labels(4, r).reshape(2, 2)), "npz"),
        "fortran": lambda r: (_npz_bytes(x=np.asfortranarray(good(4, r)), y=labels(4, r)), "npz"),
        "float16_int": lambda r: (_npz_bytes(x=good(4, r).astype(r.choice([np.float16, np.int32, np.uint8, bool])),
                                             y=labels(4, r)), "npz"),
        "npy_as_npz": lambda r: (_npy_bytes(good(4, r)), "npz"),
        "npz_as_npy": lambda r: (_npz_bytes(x=good(4, r)), "npy"),
        "one_d": lambda r: (_npz_bytes(x=good(4, r).reshape(-1), y=labels(4, r)), "npz"),
        "extra_axis": lambda r: (_npy_bytes(good(4, r)[None]), "npy"),
        "complex": lambda r: (_npz_bytes(x=good(4, r).astype(np.complex64), y=labels(4, r)), "npz"),
    }


# ------------------------------------------------------------------------------------------ the worker
def _worker(conn: Any) -> None:
    """Serve requests until the pipe closes: ('cli', argv) and ('ort', model, x_path)."""
    import resource

    limit = 6 << 30  # address space: a runaway allocation fails here instead of taking the machine down
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    os.environ["CIMC_MEMORY_BUDGET"] = WORKER_BUDGET
    import torch

    torch.set_num_threads(1)
    from cimc.cli import main

    logging.disable(logging.WARNING)
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        kind = request[0]
        if kind == "cli":
            err, out = io.StringIO(), io.StringIO()
            try:
                with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
                    code = main(list(request[1]))
                conn.send(("exit", code, err.getvalue(), out.getvalue()[-2000:]))
            except SystemExit as exc:
                conn.send(("exit", exc.code if isinstance(exc.code, int) else 1, err.getvalue(), ""))
            except BaseException as exc:  # noqa: BLE001 - recording them is the point
                tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
                conn.send(("traceback", 1, f"{type(exc).__name__}: {str(exc)[:300]}", "".join(tb[-3:])[-800:]))
        elif kind == "ort":
            conn.send(_ort_reference(request[1], request[2]))


def _ort_reference(model: str, x_path: str) -> tuple[Any, ...]:
    import onnxruntime as ort

    try:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.log_severity_level = 4
        sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        feeds = {}
        inputs = sess.get_inputs()
        if len(inputs) != 1:
            return ("rejected", f"{len(inputs)} inputs")
        x = np.load(x_path)
        feeds[inputs[0].name] = x
        out = sess.run(None, feeds)[0]
        return ("ok", np.asarray(out))
    except Exception as exc:  # noqa: BLE001 - onnxruntime's verdict on the file
        return ("rejected", f"{type(exc).__name__}: {str(exc)[:200]}")


@dataclass
class Worker:
    timeout_s: float
    process: Any = None
    conn: Any = None
    restarts: int = 0

    def start(self) -> None:
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker, args=(child,), daemon=True)
        self.process.start()
        self.conn = parent

    def call(self, request: tuple[Any, ...], timeout_s: float | None = None) -> tuple[Any, ...]:
        if self.process is None or not self.process.is_alive():
            self.start()
            self.restarts += 1
        self.conn.send(request)
        limit = timeout_s or self.timeout_s
        if not self.conn.poll(limit):
            self.stop()
            return ("hang", None, f"no answer in {limit:.0f} s", "")
        try:
            return self.conn.recv()
        except (EOFError, ConnectionResetError):
            code = self.process.exitcode if self.process else None
            self.stop()
            return ("crash", code, f"worker died (exit code {code})", "")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.join(5)
        self.process = None


# ------------------------------------------------------------------------------------------ the runner
@dataclass
class CaseResult:
    family: str
    description: str
    steps: dict[str, str] = field(default_factory=dict)
    ort: str = ""
    numeric: str = "n/a"  # agree, differ, n/a
    details: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[str]:
        bad = [f"{step}: {status}" for step, status in self.steps.items() if status in FAILURES]
        if self.numeric == "differ":
            bad.append("run: differ")
        return bad


def _classify(reply: tuple[Any, ...]) -> tuple[str, str]:
    kind, code, err, tb = reply
    if kind != "exit":
        return kind, f"{err} {tb}".strip()
    if code == 0:
        return "ok", ""
    lines = [ln for ln in (err or "").strip().splitlines() if ln.strip()]
    if code == 2 and len(lines) == 1:
        return "refused", lines[0]
    if code == 2:
        return "multiline", " | ".join(lines[:4])
    return f"exit-{code}", " | ".join(lines[:4])


def _input_shape(data: bytes) -> list[int]:
    """The first graph input's dims (dynamic → 1), for the reference input; [1] when unreadable."""
    try:
        m = onnx.ModelProto()
        m.ParseFromString(data)
        inits = {t.name for t in m.graph.initializer}
        inp = next(i for i in m.graph.input if i.name not in inits)
        dims = [d.dim_value if d.HasField("dim_value") and 0 < d.dim_value <= 64 else 1
                for d in inp.type.tensor_type.shape.dim]
        return dims or [1]
    except Exception:  # noqa: BLE001 - any garbage: the reference input does not matter then
        return [1]


class Fuzzer:
    """Runs model and data cases through a :class:`Worker`; collects :class:`CaseResult`s."""

    def __init__(self, workdir: Path, seed: int, timeout_s: float = 60.0, keep: Path | None = None,
                 exclude: tuple[str, ...] = ()):
        self.exclude = exclude
        self.workdir = workdir
        self.rng = random.Random(seed)
        self.worker = Worker(timeout_s)
        self.keep = keep
        self.results: list[CaseResult] = []

    def close(self) -> None:
        self.worker.stop()

    def _cli(self, result: CaseResult, step: str, *argv: Any, expect_one: bool = False) -> str:
        """Run one command; ``expect_one``: exit 1 is a documented verdict (verify: the bundle disagrees)."""
        reply = self.worker.call(("cli", [str(a) for a in argv]))
        if expect_one and reply[0] == "exit" and reply[1] == 1:
            result.steps[step] = "mismatch"
            result.details.append(f"{step}: {reply[3].strip()[:300]}")
            return "mismatch"
        status, detail = _classify(reply)
        result.steps[step] = status
        if status in FAILURES or status.startswith("exit-"):
            result.details.append(f"{step}: {detail}")
            if status.startswith("exit-"):
                result.steps[step] = "traceback"
        return status

    def _save_failure(self, result: CaseResult, files: list[Path]) -> None:
        if self.keep is None or not result.failed:
            return
        folder = self.keep / f"case{len(self.results):05d}"
        folder.mkdir(parents=True, exist_ok=True)
        for f in files:
            if f.is_file():
                shutil.copy(f, folder / f.name)
        (folder / "result.json").write_text(json.dumps(vars(result), indent=1, default=str))

    def model_case(self, family: str) -> CaseResult:
        seed_name = self.rng.choice(list(SEEDS))
        if family == "bytes":
            data, what = mutate_bytes(seed_name, self.rng)
        elif family == "valid":
            data, what = make_seed(seed_name, self.rng.randrange(1 << 30)).SerializeToString(), "new weights"
        else:
            data, what = mutate_model(seed_name, self.rng, self.exclude)
        case = Path(tempfile.mkdtemp(prefix="case", dir=self.workdir))
        model = case / "m.onnx"
        model.write_bytes(data)
        result = CaseResult(family, f"{seed_name}: {what}")
        x = np.random.default_rng(self.rng.randrange(1 << 30)).normal(size=_input_shape(data)).astype(np.float32)
        np.save(case / "x.npy", x)
        np.savez(case / "calib.npz", x=np.repeat(x, 4, axis=0) * np.float32(1.5), y=np.zeros(4 * len(x), np.int64))
        ort = self.worker.call(("ort", str(model), str(case / "x.npy")))
        result.ort = ort[0] if ort[0] in ("ok", "rejected") else f"ort-{ort[0]}"
        self._cli(result, "inspect", "inspect", model)
        ideal = self._cli(result, "compile ideal", "compile", model, "-t", "ideal", "-o", case / "ideal", "-q")
        if ideal == "ok":
            if self._cli(result, "run", "run", case / "ideal", "--input", case / "x.npy", "-o", case / "y.npy") == "ok":
                result.numeric = self._compare(result, ort, case / "y.npy")
        if ideal in ("ok", "refused"):  # the other presets go the same way unless the model is the problem
            aon = self._cli(result, "compile aon-cim", "compile", model, "-t", "aon-cim", "--calib", case / "calib.npz",
                            "-o", case / "aon", "-q")
            self._cli(result, "compile hermes", "compile", model, "-t", "hermes", "-o", case / "hermes", "-q")
            if aon == "ok":
                if self._cli(result, "export", "export", case / "aon", "-o", case / "bundle") == "ok":
                    self._cli(result, "verify", "verify", case / "bundle", expect_one=True)
        self._save_failure(result, [model, case / "x.npy", case / "calib.npz"])
        shutil.rmtree(case, ignore_errors=True)
        self.results.append(result)
        return result

    @staticmethod
    def _compare(result: CaseResult, ort: tuple[Any, ...], y_path: Path) -> str:
        if ort[0] != "ok":
            result.details.append("cimc runs a model onnxruntime rejects: " + str(ort[1])[:160])
            return "ort-rejects"
        ref = np.asarray(ort[1], dtype=np.float64)
        got = np.load(y_path).astype(np.float64)
        if got.shape != ref.shape:
            result.details.append(f"shape {got.shape} vs onnxruntime {ref.shape}")
            return "differ"
        finite = np.isfinite(ref)
        scale = float(np.abs(ref[finite]).max()) if finite.any() else 1.0
        same_nonfinite = np.array_equal(np.isnan(got), np.isnan(ref)) and np.array_equal(got[np.isinf(ref)],
                                                                                          ref[np.isinf(ref)])
        close = np.allclose(got[finite], ref[finite], rtol=RTOL, atol=ATOL * max(scale, 1e-30))
        if close and same_nonfinite:
            return "agree"
        bad = np.abs(got - ref)
        result.details.append(f"max |cimc - ort| = {np.nanmax(bad):.3g} (scale {scale:.3g}); nonfinite match "
                              f"{same_nonfinite}")
        return "differ"

    def data_case(self, build: Path, model: Path, breakers: dict[str, Callable[..., tuple[bytes, str]]]) -> CaseResult:
        name = self.rng.choice(list(breakers))
        data, ext = breakers[name](self.rng)
        case = Path(tempfile.mkdtemp(prefix="data", dir=self.workdir))
        path = case / f"d.{ext}"
        path.write_bytes(data)
        result = CaseResult("data", f"{name} (.{ext})", ort="n/a")
        self._cli(result, "compile --calib", "compile", model, "-t", "aon-cim", "--calib", path, "-o", case / "b", "-q")
        self._cli(result, "simulate", "simulate", build, "--data", path, "--instances", "2", "--drift", "1s,1d",
                  "--samples", "16", "-q", "-o", case / "sim")
        self._cli(result, "run", "run", build, "--input", path, "-o", case / "y.npy")
        self._save_failure(result, [path])
        shutil.rmtree(case, ignore_errors=True)
        self.results.append(result)
        return result


def summarize(results: list[CaseResult]) -> str:
    """The markdown table of outcomes per family."""
    fam: dict[str, Counter[str]] = defaultdict(Counter)
    for r in results:
        c = fam[r.family]
        c["cases"] += 1
        c["ort accepts"] += r.ort == "ok"
        statuses = list(r.steps.values())
        c["cimc ok (all steps)"] += bool(statuses) and all(s == "ok" for s in statuses)
        c["refused (one line)"] += any(s == "refused" for s in statuses)
        c["agree with ort"] += r.numeric == "agree"
        c["ort rejects, cimc runs"] += r.numeric == "ort-rejects"
        for failure in ("traceback", "multiline", "hang", "crash"):
            c[failure] += any(s == failure for s in statuses)
        c["ok but different"] += r.numeric == "differ"
        c["verify mismatch"] += any(s == "mismatch" for s in statuses)
    cols = ["cases", "ort accepts", "cimc ok (all steps)", "refused (one line)", "agree with ort",
            "ort rejects, cimc runs", "verify mismatch", "traceback", "multiline", "hang", "crash",
            "ok but different"]
    lines = ["| family | " + " | ".join(cols) + " |", "| --- " * (len(cols) + 1) + "|"]
    total: Counter[str] = Counter()
    for name in sorted(fam):
        total.update(fam[name])
        lines.append(f"| {name} | " + " | ".join(str(fam[name][c]) for c in cols) + " |")
    lines.append("| **all** | " + " | ".join(f"**{total[c]}**" for c in cols) + " |")
    return "\n".join(lines)


def _seconds(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    return float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)


def run_fuzz(models: int, data: int, seed: int, time_limit_s: float, step_timeout_s: float = 60.0,
             keep: Path | None = None, progress: bool = True, exclude: tuple[str, ...] = ()) -> list[CaseResult]:
    """Run ``models`` model cases (families in rotation) and ``data`` data cases within ``time_limit_s``."""
    families = ["structure"] * 6 + ["bytes"] * 3 + ["valid"]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="cimc-fuzz-") as tmp:
        work = Path(tmp)
        fuzzer = Fuzzer(work, seed, step_timeout_s, keep, exclude)
        try:
            for i in range(models):
                if time.monotonic() - started > time_limit_s:
                    print(f"time limit reached after {i} model cases", file=sys.stderr)
                    break
                r = fuzzer.model_case(families[i % len(families)])
                if progress and (r.failed or i % 50 == 0):
                    print(f"[{i}] {r.family} {r.description}: {r.failed or 'fine'} {r.details[:2]}", file=sys.stderr)
            if data:
                base = work / "base"
                base.mkdir()
                model = base / "m.onnx"
                model.write_bytes(make_seed("cnn", seed).SerializeToString())
                reply = fuzzer.worker.call(("cli", ["compile", str(model), "-t", "aon-cim", "-o", str(base / "b"),
                                                    "-q"]))
                assert reply[:2] == ("exit", 0), reply
                breakers = data_breakers((1, 8, 8), 3)
                for i in range(data):
                    if time.monotonic() - started > time_limit_s:
                        print(f"time limit reached after {i} data cases", file=sys.stderr)
                        break
                    r = fuzzer.data_case(base / "b", model, breakers)
                    if progress and (r.failed or i % 20 == 0):
                        print(f"[data {i}] {r.description}: {r.failed or 'fine'} {r.details[:2]}", file=sys.stderr)
        finally:
            fuzzer.close()
    return fuzzer.results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, default=1000, help="mutated model cases (default 1000)")
    parser.add_argument("--data", type=int, default=100, help="broken data-file cases (default 100)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-limit", default="40m", help="stop starting cases after this long (e.g. 40m)")
    parser.add_argument("--step-timeout", type=float, default=60.0, help="seconds one command may take")
    parser.add_argument("--keep", default=str(Path.home() / ".cache" / "cimc" / "fuzz"),
                        help="folder for failing cases (model, inputs, result.json)")
    parser.add_argument("--json", help="also write every case result here")
    parser.add_argument("--exclude", default="", help="comma-separated mutation names to skip (e.g. dup_node_name)")
    args = parser.parse_args(argv)
    keep = Path(args.keep)
    shutil.rmtree(keep, ignore_errors=True)
    t0 = time.monotonic()
    exclude = tuple(x for x in args.exclude.split(",") if x)
    results = run_fuzz(args.models, args.data, args.seed, _seconds(args.time_limit), args.step_timeout, keep,
                       exclude=exclude)
    print(summarize(results))
    failed = [r for r in results if r.failed]
    print(f"\n{len(results)} cases in {time.monotonic() - t0:.0f} s; {len(failed)} with a failure "
          f"(kept in {keep})")
    if args.json:
        Path(args.json).write_text(json.dumps([vars(r) for r in results], indent=1, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
