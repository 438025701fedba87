"""Where cimc may write: output folders and files that never destroy what the user did not ask to replace.

Every ``-o`` goes through this module. The rules (``docs/reliability.md`` lists them with the messages):

* an output is never one of the command's inputs, nor a folder that contains an input
  (``cimc compile m.onnx -o .`` from the model's folder, ``cimc export build -o build``), nor the current
  folder or one of its parents (``--force`` does not lift these);
* an existing output *folder* must be empty or a cimc output of the same kind, recognised by its marker
  file (``manifest.json`` or ``results.json`` with the kind's ``format``); anything else is refused unless
  ``--force`` is given;
* writing into an existing folder replaces only cimc's own files of that kind (the names in
  :data:`KINDS`): the user's other files and sub-folders (an earlier ``simulation/`` in a compiled folder)
  stay. Files of the previous output that the new one does not have are removed;
* the new output is built in a temporary folder beside the destination (``.cimc-tmp.<name>.<pid>.<random>``)
  and moved into place file by file, the marker last, so a reader never sees a mix (while the files are
  swapped the marker is absent and a ``.cimc-partial`` file names the kind; the next run recognises it);
* temporary folders and files left by a killed run are removed by the next write into the same parent
  folder, but only when their name has our prefix, the process that made them is gone and they are older
  than the current process.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cimc.errors import InputError

__all__ = [
    "FILE_MARK",
    "KINDS",
    "TMP_PREFIX",
    "OutputKind",
    "check_output_dir",
    "check_output_file",
    "clean_stale_temporaries",
    "close_incremental_dir",
    "mark_npy",
    "mark_npz",
    "open_incremental_dir",
    "output_dir",
    "temporary_file",
    "written_by_cimc",
]

logger = logging.getLogger(__name__)

TMP_PREFIX = ".cimc-tmp."
PARTIAL_MARKER = ".cimc-partial"
_STARTED = time.time()  # temporaries older than this and whose process is gone are stale
_TMP_RE = re.compile(re.escape(TMP_PREFIX) + r".*\.(\d+)\.[^.]+$")


@dataclass(frozen=True)
class OutputKind:
    """One kind of cimc output folder: how it is recognised and which files in it cimc owns."""

    name: str  # what the messages call it
    marker: str  # file whose JSON ``format`` names the kind
    format_prefix: str  # the marker's ``format`` starts with this
    owned: tuple[str, ...]  # file names (regular expressions) cimc writes into this kind of folder

    def owns(self, filename: str) -> bool:
        return any(re.fullmatch(pattern, filename) for pattern in self.owned)


KINDS: dict[str, OutputKind] = {
    "compiled": OutputKind(
        "compiled-model folder", "manifest.json", "cimc-compiled/",
        (r"manifest\.json", r"model\.onnx", r"model\.qdq\.onnx", r"target\.yaml", r"report\.json",
         r"occupancy\.png", r"schedule\.trace\.json"),
    ),
    "bundle": OutputKind(
        "mapping bundle", "manifest.json", "cimc-mapping",
        (r"manifest\.json", r"schema\.json", r"biases\.npz", r"gdc\.npz", r"array_\d+\.npz", r"array_\d+\.csv",
         r"provenance\.json"),
    ),
    "simulation": OutputKind(
        "simulation folder", "results.json", "cimc-simulation/", (r"results\.json", r"drift\.png", r"timings\.json"),
    ),
    "diagnosis": OutputKind(
        "diagnosis folder", "diagnose.json", "cimc-diagnose/", (r"diagnose\.json", r"diagnose\.png", r"timings\.json"),
    ),
    "demo": OutputKind("demo folder", "manifest.json", "cimc-demo/", (r"manifest\.json",)),
    # Written point by point (resumable), not swapped in: a '.cimc-partial' naming the kind marks it until
    # sweep.json is written.
    "sweep": OutputKind(
        "sweep folder", "sweep.json", "cimc-sweep/", (r"sweep\.json", r"sweep\.csv", r"pareto\.png"),
    ),
    "harden": OutputKind(
        "hardening folder", "harden.json", "cimc-harden/",
        (r"harden\.json", r"harden\.png", r"harden\.txt", r"timings\.json"),
    ),
}


def _kind_of(folder: Path) -> str | None:
    """The kind of cimc output ``folder`` is (by its marker), or None."""
    partial = folder / PARTIAL_MARKER
    if partial.is_file():
        try:
            text = partial.read_text(encoding="utf-8", errors="replace").strip()
        except OSError:
            text = ""
        if text in KINDS:
            return text
    for key, kind in KINDS.items():
        marker = folder / kind.marker
        if not marker.is_file():
            continue
        try:
            fmt = json.loads(marker.read_text(encoding="utf-8")).get("format", "")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(fmt, str) and fmt.startswith(kind.format_prefix):
            return key
    return None


def _protected(dest: Path, inputs: Iterable[Any], flag: str) -> None:
    """Refuse ``dest`` if it is an input, contains one, or is the current folder or one of its parents."""
    real = dest.resolve()
    for given in inputs:
        if given is None or not isinstance(given, (str, os.PathLike)):
            continue
        path = Path(given)
        if not path.exists():
            continue
        src = path.resolve()
        if src == real or real in src.parents:
            what = "is" if src == real else "contains"
            raise InputError(
                f"{flag} {str(dest)!r} {what} the input {str(given)!r}; writing there would destroy it: "
                f"choose a new {flag} path"
            )
    cwd = Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise InputError(
            f"{flag} {str(dest)!r} is the current folder or one of its parents; cimc writes its output into a "
            f"folder of its own: give a new name, e.g. {flag} out"
        )


def check_output_dir(dest: str | os.PathLike[str], kind: str, inputs: Iterable[Any] = (), *, force: bool = False,
                     flag: str = "-o") -> Path:
    """Check that ``dest`` may receive an output folder of ``kind`` (see the module rules); returns it absolute."""
    out = Path(os.path.abspath(os.fspath(dest)))
    spec = KINDS[kind]
    _protected(out, inputs, flag)
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise InputError(f"{flag} {str(dest)!r} is an existing file, not a folder; give a folder path for the "
                             f"{spec.name}")
        found = _kind_of(out)
        if found is not None and found != kind:
            raise InputError(f"{flag} {str(dest)!r} is a cimc {KINDS[found].name}, not a {spec.name}; "
                             f"choose another {flag} path")
        if found is None and any(out.iterdir()) and not force:
            raise InputError(
                f"{flag} {str(dest)!r} exists and is not a cimc {spec.name}; refusing to write into it: "
                f"choose a new or empty folder, or add --force to add cimc's files to it (other files are kept)"
            )
    return out


def open_incremental_dir(dest: str | os.PathLike[str], kind: str, inputs: Iterable[Any] = (), *,
                         force: bool = False, flag: str = "-o") -> Path:
    """Check ``dest`` like :func:`check_output_dir` for an output written piece by piece (a resumable sweep),
    create it and mark it with a ``.cimc-partial`` naming ``kind`` until :func:`close_incremental_dir`."""
    out = check_output_dir(dest, kind, inputs, force=force, flag=flag)
    out.mkdir(parents=True, exist_ok=True)
    (out / PARTIAL_MARKER).write_text(kind + "\n", encoding="utf-8")
    return out


def close_incremental_dir(folder: str | os.PathLike[str]) -> None:
    """The output's marker file is written: drop the ``.cimc-partial`` mark."""
    (Path(folder) / PARTIAL_MARKER).unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    except OSError:
        return True
    return True


def clean_stale_temporaries(parent: str | os.PathLike[str]) -> list[Path]:
    """Remove temporaries a killed cimc left in ``parent``: our prefix, a dead pid, older than this process."""
    removed: list[Path] = []
    folder = Path(parent)
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _TMP_RE.match(entry.name)
        if not match:
            continue
        pid = int(match.group(1))
        try:
            mtime = entry.lstat().st_mtime
        except OSError:
            continue
        if pid == os.getpid() or _pid_alive(pid) or mtime >= _STARTED:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        logger.info("removed %s, left by an interrupted cimc run", entry)
        removed.append(entry)
    return removed


def _tmp_name(name: str) -> str:
    return f"{TMP_PREFIX}{name or 'out'}.{os.getpid()}."


class output_dir:
    """Context manager: build a cimc output folder of ``kind`` in a temporary folder, then move it into place.

    ``with output_dir("build", "compiled", inputs=[model_path]) as tmp: ...write files into tmp...``.
    The destination is checked first (:func:`check_output_dir`); on an exception the temporary folder is
    removed and the destination is untouched.
    """

    def __init__(self, dest: str | os.PathLike[str], kind: str, inputs: Iterable[Any] = (), *, force: bool = False,
                 flag: str = "-o"):
        self.dest = check_output_dir(dest, kind, inputs, force=force, flag=flag)
        self.kind = KINDS[kind]
        self.key = kind
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temporaries(self.dest.parent)
        # mkdtemp's random suffix has no dots, so the stale-temporary pattern (...<pid>.<random>) is unambiguous.
        self.tmp = Path(tempfile.mkdtemp(prefix=_tmp_name(self.dest.name), dir=self.dest.parent))
        return self.tmp

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        assert self.tmp is not None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        for path in self.tmp.iterdir():  # temp-file writers create 0600 files; outputs are meant to be shared
            path.chmod(0o755 if path.is_dir() else 0o644)
        os.chmod(self.tmp, 0o755)
        if not self.dest.exists():
            os.replace(self.tmp, self.dest)
            return
        if not any(self.dest.iterdir()):
            os.rmdir(self.dest)
            os.replace(self.tmp, self.dest)
            return
        self._merge()

    def _merge(self) -> None:
        """Swap cimc's files into an existing folder one by one, the marker last; keep everything else."""
        assert self.tmp is not None
        dest, tmp, kind = self.dest, self.tmp, self.kind
        partial = dest / PARTIAL_MARKER
        partial.write_text(self.key + "\n", encoding="utf-8")
        (dest / kind.marker).unlink(missing_ok=True)
        new = {p.name for p in tmp.iterdir()}
        for name in sorted(new - {kind.marker}):
            os.replace(tmp / name, dest / name)
        for old in dest.iterdir():
            if old.name not in new and kind.owns(old.name) and old.is_file():
                old.unlink()
        if kind.marker in new:
            os.replace(tmp / kind.marker, dest / kind.marker)
        partial.unlink(missing_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        kept = sorted(p.name for p in dest.iterdir() if p.name not in new)
        if kept:
            logger.info("%s: kept %s (not cimc %s files)", dest, ", ".join(kept), kind.name)


# What cimc writes into the files it produces, so that a rerun recognises them (and nothing else) as its own.
FILE_MARK = "cimc-output/1"
_ONNX_MARK_KEYS = ("cimc.finetune", "cimc.output")


def mark_npy(data: bytes) -> bytes:
    """``.npy`` bytes with :data:`FILE_MARK` as a comment at the end of the header's space padding.

    The header is a Python literal parsed by ``ast.literal_eval``-like readers (numpy's included), for which a
    trailing comment is whitespace; the header length, the alignment and the array bytes are unchanged."""
    if data[:6] != b"\x93NUMPY":
        return data
    major = data[6]
    size_bytes = 2 if major == 1 else 4
    start = 8 + size_bytes
    length = int.from_bytes(data[8:start], "little")
    header = data[start:start + length].decode("latin1")
    body = header.rstrip("\n").rstrip(" ")
    tagged = f"{body} # {FILE_MARK}"
    if len(tagged) + 1 > length:  # no room in the padding (never for numpy's 64-byte alignment): leave as is
        return data
    tagged = tagged + " " * (length - 1 - len(tagged)) + "\n"
    return data[:start] + tagged.encode("latin1") + data[start + length:]


def mark_npz(data: bytes) -> bytes:
    """``.npz`` bytes with :data:`FILE_MARK` as the zip archive's comment (readers ignore it; no array added)."""
    import io
    import zipfile

    buf = io.BytesIO(data)
    with zipfile.ZipFile(buf, "a") as archive:
        archive.comment = FILE_MARK.encode()
    return buf.getvalue()


def written_by_cimc(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` is a file cimc wrote: an ``.npy`` whose header ends with the mark, an ``.npz`` whose
    zip comment is the mark, an ``.onnx`` with a ``cimc.finetune`` (or ``cimc.output``) metadata entry."""
    p = Path(path)
    suffix = p.suffix.lower()
    try:
        if suffix == ".npy":
            with open(p, "rb") as f:
                head = f.read(12)
                if head[:6] != b"\x93NUMPY":
                    return False
                start = 8 + (2 if head[6] == 1 else 4)
                length = int.from_bytes(head[8:start], "little")
                f.seek(start)
                return f"# {FILE_MARK}".encode() in f.read(min(length, 1 << 20))
        if suffix == ".npz":
            import zipfile

            with zipfile.ZipFile(p) as archive:
                return archive.comment == FILE_MARK.encode()
        if suffix == ".onnx":
            import onnx

            model = onnx.load(str(p), load_external_data=False)
            return any(entry.key in _ONNX_MARK_KEYS for entry in model.metadata_props)
    except Exception:  # noqa: BLE001 - unreadable or not what its name says: not ours
        return False
    return False


def check_output_file(dest: str | os.PathLike[str], suffix: str, inputs: Iterable[Any] = (), *,
                      force: bool = False, flag: str = "-o") -> Path:
    """Check an output *file* path; returns it.

    The right suffix; not a folder; never one of the command's inputs nor an existing file inside an input
    folder (``--force`` does not lift this); an existing file cimc did not write (:func:`written_by_cimc`) is
    replaced only with ``force``."""
    out = Path(os.fspath(dest))
    if out.suffix.lower() != suffix:
        raise InputError(f"{flag} {str(dest)!r} must name a {suffix} file, e.g. {flag} out{suffix}")
    if out.is_dir():
        raise InputError(f"{flag} {str(dest)!r} is a folder; give a {suffix} file name")
    real = out.resolve()
    for given in inputs:
        if given is None or not isinstance(given, (str, os.PathLike)) or not Path(given).exists():
            continue
        src = Path(given).resolve()
        if src == real:
            raise InputError(f"{flag} {str(dest)!r} is the input {str(given)!r}; writing there would destroy it: "
                             "choose a new file name")
        if src in real.parents and out.exists():
            raise InputError(f"{flag} {str(dest)!r} is a file of the input {str(given)!r}, which this command "
                             "reads; choose a file name outside it")
    if (out.exists() or out.is_symlink()) and not force and not written_by_cimc(out):
        raise InputError(f"{flag} {str(dest)!r} exists and was not written by cimc; refusing to replace it: "
                         f"choose a new file name, or add --force to replace it")
    return out


def temporary_file(dest: Path) -> tuple[int, str]:
    """An open temporary file beside ``dest`` (fd, path) whose name stale-temporary cleaning recognises."""
    parent = dest.parent if str(dest.parent) else Path(".")
    clean_stale_temporaries(parent)
    return tempfile.mkstemp(prefix=_tmp_name(dest.name), dir=parent)
