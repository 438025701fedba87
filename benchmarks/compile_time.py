"""Compile time of the KWS model onto aon-cim and of the light ResNet-50 (import, canonicalise, map, schedule).

ResNet-50 (25.5 M weights) does not fit hermes' 64 cores; it is compiled onto the 'ideal' target (unbounded
arrays, aon-cim geometry) so the mapper still places all its 401+ tiles. ShuffleNet onto hermes exercises the
multi-core placement (core sharing, both execution choices). Goals: KWS < 1 s, ResNet-50 and ShuffleNet < 10 s.
The peer in the same run is onnxruntime's session creation (graph load + optimisation) for the same file.

    python benchmarks/compile_time.py
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import onnx
import onnxruntime as ort

from cimc import builtin
from cimc.compiler import compile_model


def _time(fn) -> float:  # type: ignore[no-untyped-def]
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    logging.disable(logging.WARNING)
    ort.set_default_logger_severity(3)
    resnet = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / "light_resnet50.onnx"
    shufflenet = resnet.with_name("light_shufflenet.onnx")
    cases = [("KWS -> aon-cim", builtin.kws_model(), "aon-cim", 1.0), ("ResNet-50 (light) -> ideal", resnet, "ideal", 10.0),
             ("ShuffleNet (light) -> hermes (both execution choices placed and costed)", shufflenet, "hermes", 10.0)]
    compile_model(builtin.kws_model(), "aon-cim")  # warm imports
    for label, path, target, goal in cases:
        t = _time(lambda: compile_model(path, target))
        t_ort = _time(lambda: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]))
        print(f"{label}: compile {t:.2f} s (goal < {goal:g} s); onnxruntime session creation {t_ort:.2f} s; "
              f"ratio {t / t_ort:.1f}x")
    with tempfile.TemporaryDirectory() as tmp:
        t = _time(lambda: compile_model(builtin.kws_model(), "aon-cim", calibration="kws-val", out_dir=Path(tmp) / "b"))
    print(f"KWS -> aon-cim with calibration (1,200 clips, 256 used) and the output folder (plots, trace): {t:.2f} s")


if __name__ == "__main__":
    main()
