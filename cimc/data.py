"""Datasets: the ``.npz`` format cimc reads and writes.

A dataset file is a NumPy ``.npz`` archive with two arrays:

* ``x``: inputs, float (stored as float32 or float16; always loaded as float32), first axis = samples,
  the model's input shape after it (e.g. ``[N, 1, 49, 10]`` for the keyword-spotting MFCCs);
* ``y``: integer class labels, shape ``[N]`` (optional: unlabelled data can still be simulated, but no
  accuracy can be computed).

Built-in datasets are addressed by name (``"kws-test"``, ``"mnist-test"``...) and resolve through
:mod:`cimc.builtin`.

**Models with several inputs** take one array per input, under the input's name (``x`` stands for the input of
a one-input model). Each array is the model input's shape with its batch axis grown to N samples: ``[N, ...]``
for the usual input, ``[2, N, 128]`` for a recurrent state declared ``[2, batch, 128]``.

**Streams** (a stateful model run chunk by chunk, its state output fed back to its state input, as an
always-on chip runs a voice-activity detector): each streamed input carries a chunk axis right after its batch
axis, ``[sequences, chunks, ...]`` (e.g. ``x`` shaped ``[S, C, 576]`` for a ``[1, 576]`` audio input); a state
input is either absent (it starts at zeros) or given as its initial value, without a chunk axis. The pairs
``OUTPUT=INPUT`` are named by the user (``--stream stateN=state``) or found by :func:`find_state_pairs`.
"""

from __future__ import annotations

import logging
import os
import tempfile
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cimc.errors import DataError, InputError

__all__ = ["Dataset", "Feed", "InputSpec", "StreamPair", "batches", "bind", "check_input_array", "check_labels",
           "as_dataset", "find_state_pairs", "input_specs", "load_dataset", "load_npy", "load_npz_arrays", "parse_stream",
           "reshape_hint", "save_dataset"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dataset:
    """Inputs ``x`` (float32, ``[N, ...]``), labels ``y`` (int64, ``[N]``, or None) and a display name.

    ``inputs``: every input array of the file by name (``x`` included when present), for models with several
    inputs or streams (see :func:`bind`); None for one-input data made in code."""

    x: np.ndarray
    y: np.ndarray | None
    name: str
    inputs: dict[str, np.ndarray] | None = None

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one input (without the sample axis)."""
        return tuple(int(d) for d in self.x.shape[1:])


def _resolve(path: str | Path) -> Path:
    """A file path, or the path of a built-in dataset named like ``kws-test``."""
    candidate = Path(path)
    if candidate.exists():
        return candidate
    from cimc import builtin  # local import: builtin is a leaf package, keep data importable alone

    name = str(path)
    if name in builtin.DATASETS:
        return builtin.path(builtin.DATASETS[name])
    known = ", ".join(sorted(builtin.DATASETS))
    raise InputError(f"dataset '{path}' not found: give the path of an existing .npz file or a built-in name ({known})")


def _check_arrays(x: np.ndarray, y: np.ndarray | None, where: str) -> None:
    if not np.issubdtype(x.dtype, np.floating) and not np.issubdtype(x.dtype, np.integer):
        raise DataError(f"{where}: 'x' has dtype {x.dtype}; store the inputs as a float32 array")
    if x.ndim < 2:
        raise DataError(f"{where}: 'x' has shape {tuple(x.shape)}; it needs a sample axis first, then the input shape")
    if x.shape[0] == 0:
        raise DataError(f"{where}: 'x' has no samples (shape {tuple(x.shape)}); give at least one")
    _check_finite(x, f"{where}: 'x'")
    if y is None:
        return
    if _looks_one_hot(y) and y.shape[0] == x.shape[0]:
        raise DataError(f"{where}: 'y' has shape {tuple(y.shape)} and looks one-hot; store one integer class label "
                        "per sample: y = y.argmax(axis=1).astype(np.int64)")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{where}: 'y' has dtype {y.dtype}; store class labels as integers (e.g. y.astype(np.int64))")
    if y.ndim != 1:
        raise DataError(f"{where}: 'y' has shape {tuple(y.shape)}; store one integer label per sample ([N])")
    if y.shape[0] != x.shape[0]:
        raise DataError(
            f"{where}: 'x' has {x.shape[0]} samples but 'y' has {y.shape[0]} labels; give one label per sample"
        )


def _looks_one_hot(y: np.ndarray) -> bool:
    """[N, C] of zeros and ones with exactly one 1 per row (C ≥ 2): one-hot labels."""
    if y.ndim != 2 or y.shape[1] < 2 or not (np.issubdtype(y.dtype, np.number) or y.dtype == bool):
        return False
    values = y.astype(np.float64)
    return bool(np.isin(values, (0.0, 1.0)).all() and (values.sum(axis=1) == 1).all())


def reshape_hint(per_sample: tuple[int, ...], expected: tuple[int, ...]) -> str:
    """For a shape-mismatch error: the reshape that fixes it when the sizes agree, else nothing.

    ``per_sample`` is the data's shape after the sample axis, ``expected`` the model's input shape per sample."""
    if int(np.prod(per_sample)) != int(np.prod(expected)) or not expected:
        return ""
    dims = ", ".join(str(int(d)) for d in expected)
    return f"; the sizes agree: reshape it, x = x.reshape(len(x), {dims}), and save it again"


def _check_finite(x: np.ndarray, what: str) -> None:
    """Refuse NaN/inf inputs: calibration on them sets every range to NaN and the accuracy silently collapses."""
    if not np.issubdtype(x.dtype, np.floating):
        return
    bad = ~np.isfinite(x)
    if bad.any():
        first = int(np.argwhere(bad.reshape(len(x), -1).any(axis=1))[0, 0]) if x.ndim >= 1 and len(x) else 0
        raise DataError(f"{what} has {int(bad.sum()):,} non-finite value(s) (NaN or inf), first in sample {first}; "
                        "clean the data (e.g. np.nan_to_num) and save it again")


def _read_member(archive: Any, name: str, file: Path, limit: int | None) -> np.ndarray:
    """One array of an .npz, its header checked against the memory budget before any data is read.

    With ``limit``, only the first ``limit`` samples are read (C-order arrays), so ``--samples 64`` on a
    huge file reads 64 samples, not the whole file.
    """
    from cimc.validate import check_array_size

    member = f"{name}.npy" if f"{name}.npy" in archive.zip.namelist() else name
    with archive.zip.open(member) as handle:
        version = np.lib.format.read_magic(handle)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = reader(handle)
        if dtype.hasobject:
            raise InputError(f"dataset '{file}': '{name}' holds Python objects; store numbers (float32 inputs, "
                             "integer labels)")
        rows = shape[0] if shape else 1
        keep = rows if limit is None or not shape else min(rows, max(limit, 0))
        kept_shape = (keep, *shape[1:]) if shape else shape
        check_array_size(kept_shape, max(dtype.itemsize, 4), f"dataset '{file}': '{name}' {list(kept_shape)}",
                         "use a smaller file or fewer --samples")
        if fortran or not shape:
            return np.lib.format.read_array(archive.zip.open(member), allow_pickle=False)[:keep]
        array = np.empty(kept_shape, dtype=dtype)
        view = memoryview(array.reshape(-1).view(np.uint8)) if array.size else memoryview(b"")
        done = 0
        while done < len(view):  # read straight into the array: no second copy of a large file
            got = handle.readinto(view[done:])
            if not got:
                raise InputError(f"dataset '{file}': '{name}' is truncated; write it again")
            done += got
        return array


def load_npz_arrays(path: str | os.PathLike[str], what: str = "--input") -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` by name, each header checked (type, memory budget) before its data is read."""
    p = Path(path)
    try:
        loaded = np.load(p, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise InputError(f"{what} {p}: not a readable .npz archive ({type(exc).__name__}); save inputs with "
                         "numpy.savez(path, name=array, ...)") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise InputError(f"{what} {p} is a single .npy array, not an .npz archive; name it .npy or save with "
                         "numpy.savez")
    with loaded as archive:
        try:
            return {name: _read_member(archive, name, p, None) for name in archive.files}
        except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as exc:
            raise InputError(f"{what} {p} is truncated or corrupt ({type(exc).__name__}); write it again") from None


def load_npy(path: str | os.PathLike[str], what: str = "--input") -> np.ndarray:
    """A single ``.npy`` array, its header checked (type, memory budget) before the data is read."""
    from cimc.validate import check_array_size

    p = Path(path)
    if not p.is_file():
        raise InputError(f"{what} {p}: no such file; give a .npy array of inputs (first axis = samples)")
    try:
        with open(p, "rb") as handle:
            if handle.read(4) == b"PK\x03\x04":
                raise InputError(f"{what} {p} is an .npz archive; give a .npy array (numpy.save), or the .npz to "
                                 "a command that takes one")
            handle.seek(0)
            version = np.lib.format.read_magic(handle)
            reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                      else np.lib.format.read_array_header_2_0)
            shape, _, dtype = reader(handle)
            if dtype.hasobject:
                raise InputError(f"{what} {p} holds Python objects; save numbers with numpy.save")
            check_array_size(shape, max(dtype.itemsize, 4), f"{what} {p} {list(shape)}", "give fewer samples")
        return np.load(p, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(f"{what} {p}: not a readable .npy array ({type(exc).__name__}); save it with numpy.save") \
            from None


def check_input_array(array: Any, expected: tuple[int, ...] | None, name: str) -> np.ndarray:
    """An array of model inputs checked against one input's shape: ``[N, *expected]`` numbers, N ≥ 1, finite.

    ``expected`` is the input's shape without the sample axis (None: not checked). A single sample without
    the sample axis is refused rather than guessed. Returns the array as float32.
    """
    x = np.asarray(array)
    if x.dtype.kind not in "fiub":
        raise DataError(f"{name}: dtype {x.dtype} is not numeric; save float32 inputs")
    if x.ndim == 0:
        raise DataError(f"{name}: a scalar; give an array [samples, ...] with the model's input shape")
    if expected is not None and tuple(x.shape[1:]) != tuple(expected):
        shown = ", ".join(map(str, expected))
        raise DataError(f"{name}: shape {tuple(x.shape)} does not match the model's input [N, {shown}]; reshape it "
                        f"to that (e.g. x.reshape(-1, {shown}))")
    if x.shape[0] == 0:
        raise DataError(f"{name}: no samples (shape {tuple(x.shape)}); give at least one")
    _check_finite(x, name)
    return np.ascontiguousarray(x, dtype=np.float32)


def check_labels(y: Any, classes: int | None, where: str = "data") -> np.ndarray | None:
    """Labels as int64 class indices ``0 … classes-1`` of the model's output; a one-line DataError naming the
    problem otherwise (one label per sample, integers, in range). None stays None (unlabelled data)."""
    if y is None:
        return None
    y = np.asarray(y)
    if y.ndim != 1:
        raise DataError(f"{where}: labels 'y' must be one integer per sample, got shape {y.shape}; for other targets "
                        "use --metric cosine|mse|snr (agreement with the float model)")
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise DataError(f"{where}: labels 'y' are not integers; give class indices, or use --metric "
                            "cosine|mse|snr for regression or embedding outputs")
    elif y.dtype.kind not in "iu":
        raise DataError(f"{where}: labels 'y' have dtype {y.dtype}; give integer class indices")
    y = y.astype(np.int64)
    if classes is not None and len(y):
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= classes:
            raise DataError(f"{where}: labels span {low}..{high} but the model has {classes} classes "
                            f"(0..{classes - 1}); pass data made for this model")
    return y


def load_dataset(path: str | Path, samples: int | None = None) -> Dataset:
    """Load an ``.npz`` dataset (or a built-in one by name); ``x`` comes back float32, ``y`` int64.

    ``samples``: read only the first N samples (the file's header and size are checked first either way).
    """
    file = _resolve(path)
    if file.is_dir():
        raise InputError(f"dataset '{file}' is a folder: give the path of an .npz file with arrays 'x' and 'y'")
    try:
        with open(file, "rb") as handle:
            magic = handle.read(6)
    except OSError as exc:
        raise InputError(f"dataset '{file}' cannot be read ({type(exc).__name__}); check the path") from None
    if magic == b"\x93NUMPY":  # a lone .npy: say so without reading it (its header may claim terabytes)
        raise InputError(
            f"dataset '{file}' is a single .npy array, not an .npz archive: "
            "save it with numpy.savez(path, x=..., y=...)"
        )
    try:
        loaded = np.load(file, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise InputError(
            f"dataset '{file}' is not a readable .npz archive ({type(exc).__name__}); "
            "write it with numpy.savez(path, x=..., y=...) or cimc.data.save_dataset"
        ) from exc
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise InputError(
            f"dataset '{file}' is a single .npy array, not an .npz archive: "
            "save it with numpy.savez(path, x=..., y=...)"
        )
    with loaded as archive:
        names = [n for n in archive.files if n != "y"]
        if not names:
            raise DataError(
                f"dataset '{file}' has no inputs (it has {sorted(archive.files)}); save the inputs under the name "
                "'x' (one-input models) or under each input's name"
            )
        try:
            # --samples reads only the first N of x and y; arrays named after inputs are sliced by bind(), which
            # knows each input's batch axis (a state [2, N, 128] holds its samples on axis 1)
            x = _read_member(archive, "x", file, samples) if "x" in archive.files else None
            y = _read_member(archive, "y", file, samples) if "y" in archive.files else None
            named = {n: _read_member(archive, n, file, None) for n in names if n != "x"}
        except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as exc:
            raise InputError(
                f"dataset '{file}' is truncated or corrupt ({type(exc).__name__}); write it again"
            ) from exc
    if x is not None:
        _check_arrays(x, y if not named else None, f"dataset '{file}'")
    for n, a in named.items():
        if a.dtype.kind not in "fiub":
            raise DataError(f"dataset '{file}': '{n}' has dtype {a.dtype}; store the inputs as numbers (float32)")
        _check_finite(a, f"dataset '{file}': '{n}'")
    if y is not None and (x is None or named) and (y.ndim != 1 or y.dtype.kind not in "iu"):
        raise DataError(f"dataset '{file}': 'y' has shape {tuple(y.shape)} and dtype {y.dtype}; store one integer "
                        "label per sample ([N])")
    x32 = np.ascontiguousarray(x if x is not None else named[names[0]], dtype=np.float32)
    y64 = None if y is None else y.astype(np.int64)
    inputs = None
    if named:
        inputs = {**({"x": x32} if x is not None else {}), **named}
    logger.debug("loaded %s: x %s, %s labels, inputs %s", file, x32.shape, "no" if y64 is None else len(y64),
                 None if inputs is None else sorted(inputs))
    name = file.stem if Path(path).exists() else str(path)
    return Dataset(x=x32, y=y64, name=name, inputs=inputs)


def save_dataset(path: str | Path, x: np.ndarray, y: np.ndarray | None = None, *, float16: bool = False) -> Path:
    """Write ``x`` (and ``y``) to ``path`` as a compressed ``.npz``, atomically.

    The archive is written to a temporary file in the same folder, then renamed over ``path``, so a
    reader never sees a half-written file. ``float16=True`` halves the size of ``x`` (loading converts
    back to float32).
    """
    out = Path(path)
    if out.suffix != ".npz":
        raise InputError(f"dataset path '{out}' must end in .npz; rename it")
    x = np.asarray(x)
    y_arr = None if y is None else np.asarray(y)
    _check_arrays(x, y_arr, f"dataset '{out}'")
    arrays = {"x": x.astype(np.float16 if float16 else np.float32)}
    if y_arr is not None:
        arrays["y"] = y_arr.astype(np.int64)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=".npz.tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez_compressed(handle, **arrays)
        os.chmod(tmp_name, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp_name, out)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return out


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def batches(ds: Dataset, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """Yield ``(x, y)`` slices of ``ds`` in order, ``batch_size`` samples each (the last may be shorter)."""
    if batch_size < 1:
        raise DataError(f"batch size {batch_size} is not positive; give a batch size of 1 or more")
    for start in range(0, len(ds), batch_size):
        stop = start + batch_size
        yield ds.x[start:stop], None if ds.y is None else ds.y[start:stop]


# ---------------------------------------------------------------------------------------- model inputs, streams
@dataclass(frozen=True)
class InputSpec:
    """One graph input as data must feed it: ``shape`` as compiled (its batch axis at the compiled size),
    ``axis`` the batch axis (None: a scalar input, one value for every sample)."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    axis: int | None

    def shown(self, samples: str = "N", chunks: bool = False) -> str:
        """The shape data must have, e.g. ``[N, 1, 49, 10]`` or, streamed, ``[N, C, 576]``."""
        dims = [str(d) if d >= 0 else "?" for d in self.shape]
        if self.axis is not None:
            dims[self.axis] = samples + (", C" if chunks else "")
        return f"[{', '.join(dims)}]"


@dataclass(frozen=True)
class StreamPair:
    """A state carried between chunks: graph output ``output`` feeds graph input ``input`` at the next chunk."""

    output: str
    input: str

    def __str__(self) -> str:
        return f"{self.output}={self.input}"


def input_specs(model: Any) -> list[InputSpec]:
    """The remaining graph inputs of an onnx-ir model in graph order, with their batch axes (recorded at import
    as ``cimc.batch_axes``; axis 0 otherwise)."""
    import json

    axes = json.loads(model.metadata_props.get("cimc.batch_axes", "{}"))
    specs = []
    for v in model.graph.inputs:
        shape = tuple(int(d) if isinstance(d, int) else -1 for d in (v.shape or ()))
        dtype = np.dtype(v.dtype.numpy()) if v.dtype is not None else np.dtype(np.float32)
        specs.append(InputSpec(v.name, shape, dtype, int(axes.get(v.name, 0)) if shape else None))
    return specs


def _output_shapes(model: Any) -> dict[str, tuple[int, ...] | None]:
    return {v.name: None if v.shape is None else tuple(int(d) if isinstance(d, int) else -1 for d in v.shape)
            for v in model.graph.outputs}


_AFFIXES = ("new_", "next_", "out_", "output_", "in_", "input_", "prev_", "init_", "initial_")
_SUFFIXES = ("_output", "_input", "_out", "_in", "_new", "_next", "_prev", "_0", "_n", "out", "in", "0", "n")


def _state_key(name: str) -> str:
    """A state's name without the words that tell its input from its output (``stateN``, ``h0``/``hn``,
    ``state_in``/``state_out``, ``new_h``)."""
    key = name.lower().replace(".", "_").replace("/", "_")
    for prefix in _AFFIXES:
        if key.startswith(prefix) and len(key) > len(prefix):
            key = key[len(prefix):]
            break
    for suffix in _SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)]
    return key


def find_state_pairs(model: Any) -> list[StreamPair]:
    """State pairs of a stateful model: an output and an input with the same static shape whose names differ
    only by the words marking in and out (``stateN``/``state``, ``hn``/``h0``, ``state_out``/``state_in``).
    An output that would match several inputs is left out (name the pair with ``--stream OUT=IN``)."""
    outs = _output_shapes(model)
    specs = [s for s in input_specs(model) if s.axis is not None]
    pairs = []
    def same(a: tuple[int, ...], b: tuple[int, ...] | None) -> bool:  # an output's unknown dims match any size
        return b is None or (len(a) == len(b) and all(x == y or y == -1 for x, y in zip(a, b)))

    for out, shape in outs.items():
        match = [s.name for s in specs if same(s.shape, shape) and s.name != out
                 and _state_key(s.name) == _state_key(out)]
        if len(match) == 1:
            pairs.append(StreamPair(out, match[0]))
        elif len(match) > 1:
            logger.info("output %s could be the state of %s: name the pair with --stream", out, ", ".join(match))
    return pairs


def parse_stream(model: Any, stream: str | Sequence[str] | Sequence[StreamPair] | None) -> tuple[StreamPair, ...]:
    """The state pairs of ``stream``: ``"auto"`` (:func:`find_state_pairs`), ``["OUT=IN", ...]`` or pairs;
    each checked against the model (names exist, shapes agree). None or empty: no stream."""
    if stream is None or (not isinstance(stream, str) and len(stream) == 0):
        return ()
    specs = {s.name: s for s in input_specs(model)}
    outs = _output_shapes(model)
    if isinstance(stream, str) and stream.strip().lower() == "auto":
        pairs = find_state_pairs(model)
        if not pairs:
            raise DataError(f"--stream auto: no state pair found (an output and an input of the same shape named "
                            f"alike; inputs: {', '.join(specs)}; outputs: {', '.join(outs)}); name them with "
                            "--stream OUTPUT=INPUT")
        logger.info("stream: state pairs found by name and shape: %s", ", ".join(map(str, pairs)))
        return tuple(pairs)
    items = [stream] if isinstance(stream, (str, StreamPair)) else list(stream)
    pairs = []
    for item in items:
        if isinstance(item, StreamPair):
            pair = item
        else:
            out, sep, inp = str(item).partition("=")
            if not sep or not out.strip() or not inp.strip():
                raise InputError(f"--stream {item!r}: give OUTPUT=INPUT (the state output fed back to the state "
                                 "input at the next chunk), or auto")
            pair = StreamPair(out.strip(), inp.strip())
        if pair.output not in outs:
            raise DataError(f"--stream {pair}: '{pair.output}' is not an output of the model "
                            f"(outputs: {', '.join(outs)})")
        if pair.input not in specs:
            raise DataError(f"--stream {pair}: '{pair.input}' is not an input of the model "
                            f"(inputs: {', '.join(specs)}; a frozen --input-value is no longer an input)")
        out_shape, in_shape = outs[pair.output], specs[pair.input].shape
        if out_shape is not None and -1 not in out_shape and -1 not in in_shape and out_shape != in_shape:
            raise DataError(f"--stream {pair}: the output's shape {list(out_shape)} differs from the input's "
                            f"{list(in_shape)}; a state must come back in the shape it went in")
        pairs.append(pair)
    if len({p.input for p in pairs}) != len(pairs):
        raise InputError("--stream: an input is fed by two outputs; give each state input once")
    return tuple(pairs)


@dataclass(frozen=True)
class Feed:
    """Data bound to a model's inputs: one array per graph input, in graph order, samples on each input's batch
    axis (scalar inputs as 0-d arrays). For a stream (``pairs`` non-empty), streamed inputs carry a chunk axis
    right after the batch axis and a state input holds its initial value (zeros unless given)."""

    specs: tuple[InputSpec, ...]
    arrays: tuple[np.ndarray, ...]
    samples: int
    pairs: tuple[StreamPair, ...] = ()
    chunks: int = 0
    y: np.ndarray | None = None

    def __len__(self) -> int:
        return self.samples

    @property
    def streaming(self) -> bool:
        return bool(self.pairs)

    @property
    def state_inputs(self) -> set[str]:
        return {p.input for p in self.pairs}

    @property
    def single(self) -> np.ndarray | None:
        """The one array of a one-input, non-stream feed (the fast path everywhere), else None."""
        return self.arrays[0] if len(self.arrays) == 1 and not self.pairs and self.specs[0].axis == 0 else None

    def take(self, start: int, stop: int | None = None) -> Feed:
        """Samples ``start:stop`` of every input (and label)."""
        stop = self.samples if stop is None else min(stop, self.samples)
        arrays = tuple(a if s.axis is None else np.take(a, np.arange(start, stop), axis=s.axis)
                       for s, a in zip(self.specs, self.arrays))
        y = None if self.y is None else self.y[start:stop]
        return Feed(self.specs, arrays, max(stop - start, 0), self.pairs, self.chunks, y)

    def subset(self, index: np.ndarray) -> Feed:
        """The samples at ``index`` (in that order)."""
        arrays = tuple(a if s.axis is None else np.take(a, index, axis=s.axis) for s, a in zip(self.specs, self.arrays))
        return Feed(self.specs, arrays, len(index), self.pairs, self.chunks, None if self.y is None else self.y[index])

    def chunk(self, c: int) -> list[np.ndarray | None]:
        """The inputs of chunk ``c`` of a stream, in graph order; None where the state goes."""
        states = self.state_inputs
        out: list[np.ndarray | None] = []
        for s, a in zip(self.specs, self.arrays):
            if s.name in states:
                out.append(None)
            elif s.axis is None:
                out.append(a)
            else:
                out.append(np.take(a, c, axis=s.axis + 1))
        return out

    def initial_states(self) -> dict[str, np.ndarray]:
        """Each state input's value at the first chunk."""
        return {s.name: a for s, a in zip(self.specs, self.arrays) if s.name in self.state_inputs}


def as_dataset(data: Any, name: str = "data") -> Dataset:
    """A :class:`Dataset` from what the API takes as data: a Dataset, an ``.npz`` path or builtin name, a
    mapping of arrays by input name (``y``: labels), or one array of inputs."""
    if isinstance(data, Dataset):
        return data
    if isinstance(data, (str, os.PathLike)):
        return load_dataset(data)
    arrays, y, _ = _as_arrays(data)
    if not arrays:
        raise DataError(f"{name} has no input arrays; give one array per model input, by name")
    x = arrays.get("x", next(iter(arrays.values())))
    return Dataset(np.asarray(x), y, name, inputs=arrays if len(arrays) > 1 or "x" not in arrays else None)


def _as_arrays(data: Any) -> tuple[dict[str, np.ndarray], np.ndarray | None, str]:
    """(arrays by name, labels, what to call the data in errors) from a Dataset, mapping, array or path."""
    if isinstance(data, Feed):
        raise InputError("bind() got a Feed: it is already bound")
    if isinstance(data, Dataset):
        return (dict(data.inputs) if data.inputs else {"x": data.x}), data.y, f"dataset '{data.name}'"
    if isinstance(data, Mapping):
        arrays = {str(k): v for k, v in data.items() if k != "y"}
        y = data.get("y")
        return arrays, None if y is None else np.asarray(y), "inputs"
    if isinstance(data, (str, os.PathLike)):
        ds = load_dataset(data)
        return (dict(ds.inputs) if ds.inputs else {"x": ds.x}), ds.y, f"dataset '{ds.name}'"
    return {"x": np.asarray(data)}, None, "inputs"


def bind(data: Any, model: Any, stream: str | Sequence[str] | Sequence[StreamPair] | None = None,
         samples: int | None = None) -> Feed:
    """Bind data to a model's inputs by name (see the module docstring for the layout); ``x`` stands for the one
    input left unnamed. Missing, extra or mis-shaped inputs are one-line :class:`DataError`s naming them.

    ``data``: a :class:`Dataset`, ``{name: array}`` (``y`` = labels), an array (one-input models) or an ``.npz``
    path. ``stream``: see :func:`parse_stream`. ``samples``: keep the first N samples (sequences).
    """
    if isinstance(data, Feed):  # already bound (e.g. to the model this one was compiled from): same inputs?
        names = [s.name for s in input_specs(model)]
        if [s.name for s in data.specs] != names:
            raise DataError(f"the data were bound to inputs {[s.name for s in data.specs]}, not this model's {names}")
        return data if samples is None else data.take(0, samples)
    arrays, y, where = _as_arrays(data)
    specs = input_specs(model)
    pairs = parse_stream(model, stream)
    states = {p.input for p in pairs}
    names = [s.name for s in specs]
    if "x" in arrays and "x" not in names:
        open_ = [s.name for s in specs if s.name not in arrays and s.name not in states and s.axis is not None]
        if len(open_) == 1:
            arrays[open_[0]] = arrays.pop("x")
        elif not open_ and len(arrays) > 1:
            arrays.pop("x")  # a one-input file's x beside named arrays that cover every input: not an input
    extra = sorted(set(arrays) - set(names))
    missing = [s for s in specs if s.name not in arrays and s.name not in states]
    if extra or missing:
        parts = []
        if missing:
            parts.append("missing " + ", ".join(f"{s.name} {s.shown(chunks=bool(pairs))}" for s in missing))
        if extra:
            parts.append("not inputs of the model: " + ", ".join(f"'{n}'" for n in extra))
        hint = ("save one array per input name (numpy.savez(path, name=array, ...))"
                + (", or freeze an input when compiling (" + ", ".join(f"--input-value {s.name}=VALUE|FILE.npy"
                                                                         for s in missing) + ")" if missing else ""))
        if missing and not pairs and find_state_pairs(model):
            hint += f"; a stateful model runs as a stream with --stream auto ({', '.join(map(str, find_state_pairs(model)))})"
        raise DataError(f"{where} does not match the model's inputs ({', '.join(names)}): {'; '.join(parts)}; {hint}")
    bound: list[np.ndarray] = []
    count: int | None = None
    chunks = 0
    for s in specs:
        if s.name not in arrays:  # a state that starts at zeros: sized once the sample count is known
            bound.append(np.empty(0))
            continue
        a = np.asarray(arrays[s.name])
        if a.dtype.kind not in "biuf":
            raise DataError(f"input '{s.name}': dtype {a.dtype} is not numeric; save numbers (float32)")
        if s.axis is None:
            if a.size != 1:
                raise DataError(f"input '{s.name}' is a scalar in the model; give one number (got shape {list(a.shape)})")
            bound.append(np.asarray(a.reshape(()), dtype=s.dtype))
            continue
        streamed = bool(pairs) and s.name not in states
        if not streamed and s.axis == 0 and -1 not in s.shape:  # the usual input: the one-line checks of every path
            if where != "inputs" and a.ndim >= 2 and tuple(a.shape[1:]) != s.shape[1:]:
                raise DataError(f"{where}: input '{s.name}' has shape {tuple(a.shape[1:])} per sample but the model "
                                f"takes {s.shape[1:]}; pass data made for this model"
                                f"{reshape_hint(tuple(a.shape[1:]), s.shape[1:])}")
            a = check_input_array(a, s.shape[1:], f"input '{s.name}'")
        expected = list(s.shape)
        if streamed:
            expected.insert(s.axis + 1, -1)
        ok = a.ndim == len(expected) and all(i == s.axis or d == -1 or d == n
                                             for i, (d, n) in enumerate(zip(expected, a.shape)))
        if not ok:
            raise DataError(f"input '{s.name}': shape {list(a.shape)} does not match the model's input "
                            f"{s.shown(chunks=streamed)} (N samples on axis {s.axis}"
                            + (f", C chunks on axis {s.axis + 1}" if streamed else "") + ")")
        if streamed:
            if chunks and a.shape[s.axis + 1] != chunks:
                raise DataError(f"input '{s.name}' has {a.shape[s.axis + 1]} chunks but another input has {chunks}; "
                                "give every streamed input the same number of chunks")
            chunks = int(a.shape[s.axis + 1])
        n = int(a.shape[s.axis])
        if count is not None and n != count:
            raise DataError(f"inputs have different numbers of samples ({count}, and {n} for '{s.name}'); give each "
                            "input the same number of samples on its batch axis")
        count = n
        if a.dtype.kind == "f":
            _check_finite(a, f"input '{s.name}'")
        bound.append(np.ascontiguousarray(a, dtype=s.dtype))
    if count is None:
        raise DataError(f"{where}: no input with samples; the model needs at least one input with a batch axis")
    if count == 0 or (pairs and chunks == 0):
        raise DataError(f"{where}: no samples (or no chunks) in the inputs; give at least one")
    for i, s in enumerate(specs):
        if s.name in states and s.name not in arrays:
            shape = list(s.shape)
            shape[s.axis] = count  # type: ignore[index]
            bound[i] = np.zeros([max(d, 1) for d in shape], dtype=s.dtype)
            logger.info("stream: state '%s' starts at zeros %s", s.name, shape)
    if y is not None:
        y = np.asarray(y)
        if y.ndim < 1 or y.shape[0] != count:
            raise DataError(f"{where}: {count} samples but {y.shape[0] if y.ndim else 0} labels in 'y'; give one "
                            "label per sample")
    feed = Feed(tuple(specs), tuple(bound), count, pairs, chunks, y)
    return feed if samples is None else feed.take(0, samples)
