"""User-facing errors.

Every problem a user can cause (a bad path, a model cimc cannot map, a target file with a wrong field)
raises a subclass of :class:`CimcError`. The CLI prints its message as one line and exits with code 2;
anything else is a bug in cimc and keeps its traceback.

A message names the problem and the fix: "unsupported op 'NonMaxSuppression' at node 'nms_1': ...;
remove it from the exported graph or run it on the host".
"""

from __future__ import annotations

__all__ = [
    "CimcError",
    "InputError",
    "ModelError",
    "UnsupportedOpError",
    "TargetError",
    "FitError",
    "DataError",
    "ResourceError",
]


class CimcError(Exception):
    """Base class: a problem with the user's input, reported as one line, exit code 2."""

    exit_code = 2


class InputError(CimcError):
    """A path that does not exist, a file of the wrong kind, a truncated file."""


class ModelError(CimcError):
    """A model cimc cannot take as it is (dynamic shapes, malformed graph)."""


class UnsupportedOpError(ModelError):
    """One or more nodes use ops that neither the analog array nor the digital unit implements."""

    #: Node names quoted per op type; the rest are counted ("… and 42 more"), so the line stays readable.
    EXAMPLES = 3

    def __init__(self, offending: list[tuple[str, str, str]]):
        # offending: (node name, op type, reason)
        self.offending = offending
        by_op: dict[str, list[tuple[str, str]]] = {}
        for name, op, why in offending:
            by_op.setdefault(op, []).append((name, why))
        parts = []
        for op, nodes in by_op.items():
            names = ", ".join(f"'{name}'" for name, _ in nodes[: self.EXAMPLES])
            if len(nodes) > self.EXAMPLES:
                names += f" and {len(nodes) - self.EXAMPLES} more"
            reasons = "; ".join(dict.fromkeys(why for _, why in nodes))
            parts.append(f"{op} x{len(nodes)} ({names}): {reasons}")
        super().__init__(
            f"{len(offending)} unsupported node(s) of {len(by_op)} op type(s): {' | '.join(parts)}. "
            "Export the model without these ops (or run them on the host) and try again"
        )


class TargetError(CimcError):
    """A hardware target that does not exist or whose description is invalid."""


class FitError(CimcError):
    """The model does not fit the target (devices, SRAM), with the numbers."""


class DataError(CimcError):
    """A dataset file that is missing arrays, has wrong shapes or types."""


class ResourceError(CimcError):
    """A tensor or data array larger than the memory budget (``--memory-budget`` / ``CIMC_MEMORY_BUDGET``)."""
