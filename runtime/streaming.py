"""Run bound data (:class:`cimc.data.Feed`) through an executor: several inputs at once, and streams.

A stream runs chunk by chunk, as an always-on chip runs a voice-activity or keyword detector: at chunk c every
streamed input gives its c-th chunk, each state input gets the state output of chunk c-1 (its initial value at
c = 0), and the analog hooks of the executor (one chip instance, or several in the batch) stay in place the
whole time, so each chip instance carries its own state.

Outputs of a stream: every output that is not a state comes back per chunk, stacked on a chunk axis right
after the batch axis (``[B, C, ...]``); a state output comes back as its value after the last chunk.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from cimc.data import Feed

__all__ = ["batch_of", "feed_forward", "first_output", "unroll_stream"]

logger = logging.getLogger(__name__)

Runner = Callable[..., Sequence[torch.Tensor]]


def _tensor(a: np.ndarray | torch.Tensor, axis: int | None, repeat: int) -> torch.Tensor:
    """One input as a tensor, repeated ``repeat`` times along its batch axis (instance-major, as the
    simulator lays Monte Carlo instances out)."""
    t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))
    if repeat == 1 or axis is None:
        return t
    reps = [1] * t.dim()
    reps[axis] = repeat
    return t.repeat(*reps)


def feed_forward(executor: Any, feed: Feed, repeat: int = 1,
                 on_chunk: Callable[[int, dict[str, torch.Tensor]], None] | None = None) -> list[torch.Tensor]:
    """Every output of ``executor`` (an :class:`~cimc.runtime.executor.Executor` or anything called the same
    way) on ``feed``, the samples repeated ``repeat`` times along each batch axis.

    ``on_chunk(c, states)``, for streams: called with the state inputs of chunk c before it runs.
    """
    if not feed.streaming:
        return list(executor(*[_tensor(a, s.axis, repeat) for s, a in zip(feed.specs, feed.arrays)]))
    specs = feed.specs
    state = {name: _tensor(a, next(s.axis for s in specs if s.name == name), repeat)
             for name, a in feed.initial_states().items()}
    out_names = list(executor.output_names)
    out_index = {n: i for i, n in enumerate(out_names)}
    state_outputs = {p.output for p in feed.pairs}
    chunks: list[Sequence[torch.Tensor]] = []
    for c in range(feed.chunks):
        if on_chunk is not None:
            on_chunk(c, state)
        inputs = [state[s.name] if a is None else _tensor(a, s.axis, repeat) for s, a in zip(specs, feed.chunk(c))]
        outs = executor(*inputs)
        for p in feed.pairs:
            state[p.input] = outs[out_index[p.output]]
        chunks.append(outs)
    return [chunks[-1][i] if name in state_outputs else torch.stack([o[i] for o in chunks], dim=1)
            for i, name in enumerate(out_names)]


def batch_of(x: np.ndarray | Feed, start: int, stop: int) -> torch.Tensor | Feed:
    """Samples ``start:stop``: a float32 tensor of a plain array, a :class:`Feed` of a feed."""
    if isinstance(x, Feed):
        return x.take(start, stop)
    return torch.from_numpy(np.ascontiguousarray(x[start:stop], dtype=np.float32))


def first_output(executor: Any, xb: torch.Tensor | Feed, repeat: int = 1) -> torch.Tensor:
    """The first output on a batch of :func:`batch_of` (per chunk for a stream: ``[B, C, ...]``)."""
    if isinstance(xb, torch.Tensor):
        return executor(xb if repeat == 1 else xb.repeat(repeat, *([1] * (xb.dim() - 1))))[0]
    return feed_forward(executor, xb, repeat)[0]


def unroll_stream(executor: Any, feed: Feed, batch_size: int = 64) -> Feed:
    """A stream as independent samples with real states: the model as ``executor`` runs (the float model, for
    calibration) is run over every sequence, and each chunk becomes one sample whose state inputs are the
    states that chunk really saw. Samples come sequence-major: (s0 c0, s0 c1, ..., s1 c0, ...)."""
    if not feed.streaming:
        return feed
    specs = feed.specs
    seen: dict[str, list[list[np.ndarray]]] = {name: [] for name in feed.state_inputs}
    with torch.no_grad():
        for start in range(0, len(feed), batch_size):
            part = feed.take(start, start + batch_size)
            per_chunk: dict[str, list[np.ndarray]] = {name: [] for name in seen}

            def record(c: int, states: dict[str, torch.Tensor], per_chunk: dict[str, list[np.ndarray]] = per_chunk
                       ) -> None:
                for name, t in states.items():
                    per_chunk[name].append(t.detach().numpy().copy())

            feed_forward(executor, part, on_chunk=record)
            for name, chunks in per_chunk.items():
                seen[name].append(chunks)
    arrays = []
    for s, a in zip(specs, feed.arrays):
        if s.axis is None:
            arrays.append(a)
            continue
        if s.name in seen:  # per batch, per chunk: [.., B, ..] -> stack chunks after the batch axis, join batches
            a = np.concatenate([np.stack(chunks, axis=s.axis + 1) for chunks in seen[s.name]], axis=s.axis)
        shape = list(a.shape)
        merged = shape[: s.axis] + [shape[s.axis] * shape[s.axis + 1]] + shape[s.axis + 2:]
        arrays.append(np.ascontiguousarray(a.reshape(merged)))
    samples = len(feed) * feed.chunks
    logger.info("stream unrolled: %d sequence(s) x %d chunk(s) = %d samples with the float model's states",
                len(feed), feed.chunks, samples)
    return Feed(specs, tuple(arrays), samples)
