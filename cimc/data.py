"""Datasets: the ``.npz`` format cimc reads and writes.

A dataset file is a NumPy ``.npz`` archive with two arrays:

* ``x``: inputs, float (stored as float32 or float16; always loaded as float32), first axis = samples,
  the model's input shape after it (e.g. ``[N, 1, 49, 10]`` for the keyword-spotting MFCCs);
* ``y``: integer class labels, shape ``[N]`` (optional: unlabelled data can still be simulated, but no
  accuracy can be computed).

Built-in datasets are addressed by name (``"kws-test"``, ``"mnist-test"``...) and resolve through
:mod:`cimc.builtin`.
"""

from __future__ import annotations

import logging
import os
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cimc.errors import DataError, InputError

__all__ = ["Dataset", "batches", "check_input_array", "check_labels", "load_dataset", "load_npy", "load_npz_arrays",
           "reshape_hint", "save_dataset"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dataset:
    """Inputs ``x`` (float32, ``[N, ...]``), labels ``y`` (int64, ``[N]``, or None) and a display name."""

    x: np.ndarray
    y: np.ndarray | None
    name: str

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
        if "x" not in archive.files:
            raise DataError(
                f"dataset '{file}' has no array 'x' (it has {sorted(archive.files)}); "
                "save the inputs under the name 'x'"
            )
        try:
            x = _read_member(archive, "x", file, samples)
            y = _read_member(archive, "y", file, samples) if "y" in archive.files else None
        except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as exc:
            raise InputError(
                f"dataset '{file}' is truncated or corrupt ({type(exc).__name__}); write it again"
            ) from exc
    _check_arrays(x, y, f"dataset '{file}'")
    x32 = np.ascontiguousarray(x, dtype=np.float32)
    y64 = None if y is None else y.astype(np.int64)
    logger.debug("loaded %s: x %s, %s labels", file, x32.shape, "no" if y64 is None else len(y64))
    name = file.stem if Path(path).exists() else str(path)
    return Dataset(x=x32, y=y64, name=name)


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
