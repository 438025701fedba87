"""A bounded slice of the fuzzing harness (``benchmarks/fuzz.py``): the long run is by hand, see
``docs/reliability.md``. Every case must end in ``ok`` or a one-line refusal, and every model onnxruntime
and cimc both run must give the same numbers."""

from __future__ import annotations

import random

import numpy as np
import onnx
import pytest

from benchmarks.fuzz import MUTATORS, SEEDS, make_seed, mutate_bytes, mutate_model, run_fuzz, summarize


def test_seeds_are_valid_models_onnxruntime_runs() -> None:
    import onnxruntime as ort

    for name in SEEDS:
        model = make_seed(name, 0)
        onnx.checker.check_model(model, full_check=True)
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        shape = [d if isinstance(d, int) else 1 for d in sess.get_inputs()[0].shape]
        (out,) = sess.run(None, {sess.get_inputs()[0].name: np.ones(shape, np.float32)})
        assert np.isfinite(out).all()


def test_mutations_are_seeded_and_change_the_model() -> None:
    for name in SEEDS:
        a, what_a = mutate_model(name, random.Random(3))
        b, what_b = mutate_model(name, random.Random(3))
        assert a == b and what_a == what_b  # same seed, same mutant
        assert a != make_seed(name, 0).SerializeToString()
        assert mutate_bytes(name, random.Random(4)) == mutate_bytes(name, random.Random(4))
    assert set(MUTATORS) >= {"attribute", "dtype", "dims", "names", "graph", "generator"}


@pytest.mark.slow
def test_bounded_fuzz_slice_has_no_failures() -> None:
    # Every mutation family runs, duplicate and empty node names included (cimc.ir.name_nodes fixes them at import).
    results = run_fuzz(models=24, data=10, seed=12345, time_limit_s=50.0, step_timeout_s=60.0, progress=False)
    table = summarize(results)
    failures = [(r.family, r.description, r.failed, r.details[:2]) for r in results if r.failed]
    assert len(results) >= 12, table  # the slice really ran (it stops starting cases after 50 s on a busy machine)
    assert not failures, (table, failures)
