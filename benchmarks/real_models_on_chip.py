"""Real models at their real jobs on the chip, scored in task terms.

Three real packages' models run on simulated chips and are scored as their users would score them, on audio
synthesised offline with espeak-ng (several voices; the scored clips never enter calibration):

* **wake words** (openWakeWord 0.5.1: mel front end -> embedding CNN -> four wake-word heads, all ONNX from the
  wheel): mel and embedding on ``hermes``, the heads too (a head's
  1536x128 layer is larger than aon-cim's one array). Per wake word: ROC-AUC over clips (a clip's
  score = the head's highest score over the clip) and the detection rate at the float threshold 0.5.
* **streaming VAD** (silero-vad 6.2.3, 512-sample chunks with 64 samples of context, its LSTM state carried
  between chunks on the chip): one ``hermes`` chip. Speech clips' mean max-probability, noise clips' mean
  probability (and mean max-probability).
* **digits** (scikit-learn's 8x8 digits, a small CNN the script trains with torch and exports to ONNX: the
  corpus's MNIST-like classifier), on ``aon-cim``: accuracy.

Each model is compiled once per *step* (a mitigation, added to the base configuration on its own) and run on
``--instances`` chip instances at each ``--times`` time after programming, chip by chip (cimc.run, the same
devices cimc simulate draws). Steps available now: ``base``, ``states`` (VAD: calibrate on the real states of the
stream, not zeros), ``digital`` (keep layers of at most ``--few-rows`` rows digital), ``percentile`` (converter
ranges at the 99.9th percentile, no MSE search), ``column`` (per-column ADC gain and drift compensation). More
steps are one entry in ``STEPS``.

Setup (optional benchmark dependencies; never core ones, the wheels' own dependencies are not needed)::

    pip install --no-deps openwakeword==0.5.1 silero-vad==6.2.3
    apt-get install -y espeak-ng

Run (writes results.json, a Markdown table and PNG plots; audio is cached under --cache, outside git)::

    OMP_NUM_THREADS=1 nice python benchmarks/real_models_on_chip.py --instances 3 -o real-models-on-chip
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import math
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["STEPS", "main"]

logger = logging.getLogger("real_models_on_chip")

RATE = 16000
WAKE_WORDS = {"alexa": "alexa_v0.1.onnx", "hey jarvis": "hey_jarvis_v0.1.onnx",
              "hey mycroft": "hey_mycroft_v0.1.onnx", "hey rhasspy": "hey_rhasspy_v0.1.onnx"}
# espeak-ng says "mycroft" as one unfamiliar word; spelt as two, it says what the model was trained on
SPOKEN = {"hey mycroft": "hey my croft"}
NEGATIVE_PHRASES = ("hello there", "what time is it", "turn on the lights", "good morning", "hey marvin", "alex",
                    "jarvis", "my computer", "play some music", "raspberry pie", "hey siri", "weather today")
CALIB_PHRASES = ("open the door", "how are you", "set a timer", "call my mother", "seven eight nine", "thank you")
# Scored voices and calibration voices never overlap, nor do their clips.
SCORED_VOICES = ("en-us+m3", "en-gb+f2", "en-gb-scotland+m1", "en-029+f3", "en-us-nyc+m5", "en-gb-x-rp+f4")
CALIB_VOICES = ("en-us+f1", "en-gb+m2", "en-gb-x-gbclan+m4", "en-gb-x-gbcwmd+f3")
SPEEDS = (150, 185)
CLIP_S = 3.0
WW_EARLIEST_S = 1.2  # the heads look at the last ~2 s: a wake word must end after the first window does
WW_THRESHOLD = 0.5
VAD_CHUNK, VAD_CONTEXT = 512, 64


# ------------------------------------------------------------------------------------------------ audio
def _espeak(text: str, voice: str, speed: int, pitch: int, cache: Path) -> np.ndarray:
    """One utterance at 16 kHz, float in [-1, 1], cached by (text, voice, speed, pitch)."""
    from scipy.io import wavfile
    from scipy.signal import resample_poly

    key = hashlib.sha256(f"{text}|{voice}|{speed}|{pitch}".encode()).hexdigest()[:16]
    wav = cache / "espeak" / f"{key}.wav"
    if not wav.exists():
        wav.parent.mkdir(parents=True, exist_ok=True)
        tmp = wav.with_suffix(".tmp.wav")
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(tmp), text],
                       check=True, capture_output=True)
        tmp.replace(wav)
    rate, data = wavfile.read(wav)
    audio = data.astype(np.float32) / 32768.0
    return resample_poly(audio, RATE, rate).astype(np.float32) if rate != RATE else audio


def _noise(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """White, pink or brown noise of unit RMS."""
    white = rng.standard_normal(n)
    if kind == "white":
        x = white
    else:
        spectrum = np.fft.rfft(white)
        f = np.arange(len(spectrum), dtype=np.float64)
        f[0] = 1.0
        spectrum /= f ** (0.5 if kind == "pink" else 1.0)
        x = np.fft.irfft(spectrum, n)
    return (x / (np.sqrt(np.mean(x**2)) + 1e-12)).astype(np.float32)


def _clip(speech: np.ndarray | None, rng: np.random.Generator, seconds: float = CLIP_S, noise_db: float = -55.0,
          peak: float = 0.5, earliest_s: float = 0.05) -> np.ndarray:
    """A clip of ``seconds``: the utterance at a random offset (not before ``earliest_s``) and gain over quiet
    white noise."""
    n = int(seconds * RATE)
    out = _noise("white", n, rng) * 10 ** (noise_db / 20)
    if speech is not None:
        first = int(earliest_s * RATE)
        speech = speech[: n - first - RATE // 20]
        gain = peak * rng.uniform(0.5, 1.0) / (np.abs(speech).max() + 1e-9)
        start = int(rng.integers(first, max(first + 1, n - len(speech) - RATE // 20)))
        out[start : start + len(speech)] += gain * speech
    return out.astype(np.float32)


def _noise_clips(count: int, rng: np.random.Generator, seconds: float = CLIP_S) -> np.ndarray:
    kinds = ("white", "pink", "brown")
    levels = (-40.0, -30.0, -20.0, -14.0)
    clips = []
    for i in range(count):
        x = _noise(kinds[i % 3], int(seconds * RATE), rng) * 10 ** (levels[(i // 3) % len(levels)] / 20)
        clips.append(x.astype(np.float32))
    return np.stack(clips)


@dataclass
class Audio:
    """The clips of one experiment: scored (with labels) and calibration (never scored)."""

    scored: np.ndarray  # [N, samples], float in [-1, 1]
    labels: list[str]  # the phrase of each scored clip ("" for noise)
    calib: np.ndarray


def wake_word_audio(cache: Path, quick: bool) -> Audio:
    rng = np.random.default_rng(2024)
    voices = SCORED_VOICES[:3] if quick else SCORED_VOICES
    scored, labels = [], []
    for word in WAKE_WORDS:
        for v in voices:
            for s in SPEEDS:
                scored.append(_clip(_espeak(SPOKEN.get(word, word), v, s, 50, cache), rng, earliest_s=WW_EARLIEST_S))
                labels.append(word)
    for phrase in NEGATIVE_PHRASES[: 6 if quick else None]:
        for v in voices[:3]:
            scored.append(_clip(_espeak(phrase, v, 165, 50, cache), rng, earliest_s=WW_EARLIEST_S))
            labels.append(phrase)
    noise = _noise_clips(6 if quick else 12, rng)
    scored.extend(noise)
    labels.extend([""] * len(noise))
    calib = [_clip(_espeak(SPOKEN.get(p, p), v, 160, 45, cache), rng, earliest_s=WW_EARLIEST_S)
             for p in (*WAKE_WORDS, *CALIB_PHRASES) for v in CALIB_VOICES]
    calib.extend(_noise_clips(4, rng))
    return Audio(np.stack(scored), labels, np.stack(calib))


def vad_audio(cache: Path, quick: bool) -> Audio:
    rng = np.random.default_rng(77)
    voices = SCORED_VOICES[:3] if quick else SCORED_VOICES
    phrases = NEGATIVE_PHRASES[:4] if quick else NEGATIVE_PHRASES[:8]
    scored, labels = [], []
    for i, phrase in enumerate(phrases):
        for v in voices[i % 2 :: 2]:
            scored.append(_clip(_espeak(phrase, v, 160, 50, cache), rng, seconds=2.0, noise_db=-50.0))
            labels.append("speech")
    noise = _noise_clips(len(scored), rng, seconds=2.0)
    scored.extend(noise)
    labels.extend(["noise"] * len(noise))
    calib = [_clip(_espeak(p, v, 160, 45, cache), rng, seconds=2.0, noise_db=-50.0)
             for p in CALIB_PHRASES for v in CALIB_VOICES[:2]]
    calib.extend(_noise_clips(6, rng, seconds=2.0))
    return Audio(np.stack(scored), labels, np.stack(calib))


# ------------------------------------------------------------------------------------------------ metrics
def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC-AUC: the chance that a positive clip outscores a negative one (ties count half)."""
    pos, neg = scores[positive], scores[~positive]
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


# ------------------------------------------------------------------------------------------------ steps
@dataclass(frozen=True)
class Step:
    """One configuration to compile and score: its name, what it changes, and how (compile keyword arguments
    derived from the base ones and the float-compiled model)."""

    name: str
    what: str
    apply: Callable[[dict[str, Any], Any], dict[str, Any] | None]  # (base kwargs, base compiled) -> kwargs or None


def _few_row_layers(compiled: Any, few_rows: int) -> list[str]:
    rows = []
    for node in compiled.model.graph:
        if "cimc.matrix" in node.metadata_props:
            m = json.loads(node.metadata_props["cimc.matrix"])
            k = m.get("rows", m.get("k", None))
            if k is not None and int(k) <= few_rows:
                rows.append(node.name)
    return rows


def _step_digital(few_rows: int) -> Callable[[dict[str, Any], Any], dict[str, Any] | None]:
    def apply(kw: dict[str, Any], base: Any) -> dict[str, Any] | None:
        layers = _few_row_layers(base, few_rows)
        return {**kw, "digital": tuple(layers)} if layers else None
    return apply


def _step_percentile(kw: dict[str, Any], base: Any) -> dict[str, Any] | None:
    return {**kw, "pipeline": "canonicalize,map,quantize{percentile=99.9,clip=percentile},schedule"}


def _step_column(kw: dict[str, Any], base: Any) -> dict[str, Any] | None:
    from cimc.targets import load_target

    t = load_target(kw["target"]) if isinstance(kw["target"], str) else kw["target"]
    try:
        derived = t.with_overrides(**{"converters.adc_gain": "column", "device.gdc": "column",
                                      "device.weight_scale": "column"})
    except (ValueError, TypeError, KeyError) as exc:  # a device model without per-column compensation
        logger.info("column step not available on %s: %s", t.name, exc)
        return None
    return {**kw, "target": derived}


def _step_column_weights(kw: dict[str, Any], base: Any) -> dict[str, Any] | None:
    from cimc.targets import load_target

    t = load_target(kw["target"]) if isinstance(kw["target"], str) else kw["target"]
    return {**kw, "target": t.with_overrides(**{"device.weight_scale": "column"})}


def _step_states(kw: dict[str, Any], base: Any) -> dict[str, Any] | None:
    return {**kw, **kw.pop("_states")} if "_states" in kw else None


DIAGNOSED_SNR_DB = 0.0  # the "diagnosed" step keeps layers digital whose output SNR (every cause) is below this


def _step_diagnosed(kw: dict[str, Any], base: Any) -> dict[str, Any] | None:
    """Keep digital the layers that ``cimc diagnose`` (24 h, 2 chips, on the calibration data, never the scored
    clips) finds below ``DIAGNOSED_SNR_DB`` with every cause on: what a user following its table would do."""
    import cimc

    states = kw.get("_states", {})
    data = states.get("calibration", kw["calibration"])
    if isinstance(data, dict):
        data = {k: (v[:32] if k in ("x", "input") or v.ndim < 3 else v) for k, v in data.items()}
    result = cimc.diagnose(base, data, time="24h", instances=2, samples=32, metric="relerr",
                           stream=states.get("stream", kw.get("stream")))
    weak = [row["name"] for row in result.data["layers"] if row["snr_db"]["all"] < DIAGNOSED_SNR_DB]
    logger.info("diagnosed: %d layer(s) below %.0f dB kept digital: %s", len(weak), DIAGNOSED_SNR_DB, weak)
    return {**kw, "digital": tuple(dict.fromkeys((*kw.get("digital", ()), *weak)))} if weak else None


STEPS: dict[str, Callable[[int], Step]] = {
    "base": lambda fr: Step("base", "compiled with calibration on unscored clips", lambda kw, b: kw),
    "states": lambda fr: Step("states", "calibration on the stream's real states (float model run over it)",
                              _step_states),
    "digital": lambda fr: Step("digital", f"layers of <= {fr} rows kept digital", _step_digital(fr)),
    "percentile": lambda fr: Step("percentile", "converter ranges at the 99.9th percentile (no MSE search)",
                                  _step_percentile),
    "diagnosed": lambda fr: Step("diagnosed", f"layers diagnose finds below {DIAGNOSED_SNR_DB:.0f} dB kept digital",
                                 _step_diagnosed),
    "column": lambda fr: Step("column", "per-column weight scale, ADC gain and drift compensation", _step_column),
    "column-weights": lambda fr: Step("column-weights", "per-column weight scale only (layer ADC gain and GDC)",
                                      _step_column_weights),
    # wake words only: each stage through `cimc harden` (label-free metric, on calibration clips, 24 h); then the
    # embedding model fine-tuned by distillation on speech of the calibration voices, compiled and hardened again
    "harden": lambda fr: Step("harden", "each stage hardened by cimc.harden (24 h, label-free, calibration clips)",
                              lambda kw, b: None),
    "finetune": lambda fr: Step("finetune", "embedding fine-tuned by distillation (calibration voices), then "
                                "every stage hardened", lambda kw, b: None),
}
HARDEN_METRIC = {"mel": "relerr", "emb": "cosine", "heads": None}  # None: harden's default (snr for one output)
FT_PHRASES = ("the quick brown fox", "alexa", "hey jarvis", "hey my croft", "hey rhasspy", "open the window",
              "what is the weather", "lights off please", "start the timer", "next song", "volume up", "good night",
              "where is my phone", "one two three four", "send a message", "stop", "hey there", "read the news")
FT_RECIPE = {"method": "distill+pcm+qat+clip", "clip_alpha": 3.0, "lr": 1e-4, "epochs": 3}


# ------------------------------------------------------------------------------------------------ runner
@dataclass
class Ctx:
    times: list[str]
    instances: int
    seed: int
    out: Path
    cache: Path
    quick: bool
    few_rows: int
    steps: list[str]
    harden_rounds: int = 2
    results: dict[str, Any] = field(default_factory=dict)


def _compile(model: Path, kw: dict[str, Any]) -> Any:
    import cimc

    kw = {k: v for k, v in kw.items() if not k.startswith("_")}
    return cimc.compile(model, kw.pop("target"), **kw)


def _energy(compiled: Any) -> dict[str, float]:
    r = compiled.report()
    return {"energy_per_inference_j": float(r["energy_per_inference_j"]), "latency_s": float(r["latency_s"])}


def _chips(ctx: Ctx) -> list[tuple[str, int | None]]:
    """(time, instance) of every chip run; ("ideal", None) is the quantised model on ideal devices."""
    return [("ideal", None)] + [(t, k) for t in ctx.times for k in range(ctx.instances)]


def _run(compiled: Any, inputs: Any, t: str, k: int | None, ctx: Ctx, **kw: Any) -> Any:
    import cimc

    if k is None:
        return cimc.run(compiled, inputs, ideal=True, **kw)
    return cimc.run(compiled, inputs, time=t, instance=k, instances=ctx.instances, seed=ctx.seed, **kw)


def _summarise(rows: list[dict[str, Any]], keys: Sequence[str]) -> dict[str, Any]:
    """Mean and min over chip instances per time, per metric key."""
    out: dict[str, Any] = {}
    for t in dict.fromkeys(r["time"] for r in rows):
        at = [r for r in rows if r["time"] == t]
        out[t] = {k: {"mean": float(np.mean([r[k] for r in at])), "min": float(np.min([r[k] for r in at])),
                      "per_instance": [float(r[k]) for r in at]} for k in keys}
    return out


# --- wake words
def _package_path(module: str, pip_spec: str, *parts: str) -> Path:
    """A file or folder inside an installed optional package, or exit with the line that installs it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{module} is not installed: pip install --no-deps {pip_spec}")
    return Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)


def _oww_dir() -> Path:
    return _package_path("openwakeword", "openwakeword==0.5.1", "resources", "models")


def _mel_windows(mel: np.ndarray) -> np.ndarray:
    """openWakeWord's embedding input: windows of 76 mel frames, every 8 frames: [clips, windows, 76, 32, 1]."""
    spec = mel.reshape(mel.shape[0], -1, 32) / 10.0 + 2.0  # the package's melspectrogram transform
    starts = range(0, spec.shape[1] - 76 + 1, 8)
    return np.stack([spec[:, s : s + 76] for s in starts], axis=1)[..., None].astype(np.float32)


def _head_windows(emb: np.ndarray) -> np.ndarray:
    """The heads' input: 16 consecutive embeddings: [clips, windows, 16, 96]."""
    starts = range(emb.shape[1] - 16 + 1)
    return np.stack([emb[:, s : s + 16] for s in starts], axis=1).astype(np.float32)


def _ort(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def _ww_float(models: Path, audio: np.ndarray, heads: bool = True
              ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Float chain with onnxruntime: mel [N, ...], embeddings [N, E, 96], head scores per word [N, H]."""
    mel = np.stack([_ort(models / "melspectrogram.onnx", {"input": a[None] * 32767.0}) for a in audio])
    win = _mel_windows(mel)
    emb = _ort(models / "embedding_model.onnx", {"input_1": win.reshape(-1, 76, 32, 1)})
    emb = emb.reshape(win.shape[0], win.shape[1], 96)
    scores: dict[str, np.ndarray] = {}
    for word, file in WAKE_WORDS.items() if heads else ():
        name = _head_input(models / file)
        scores[word] = np.array([[_ort(models / file, {name: h[None]})[0, 0] for h in clip]
                                 for clip in _head_windows(emb)])
    return mel, emb, scores


def _head_input(path: Path) -> str:
    import onnx

    return onnx.load(str(path)).graph.input[0].name


def _ww_scores(scores: dict[str, np.ndarray], labels: list[str]) -> dict[str, float]:
    out = {}
    for word, s in scores.items():
        clip = s.max(axis=1)
        pos = np.array([lab == word for lab in labels])
        out[f"{word}: auc"] = roc_auc(clip, pos)
        out[f"{word}: detected"] = float((clip[pos] >= WW_THRESHOLD).mean())
        out[f"{word}: false alarms"] = float((clip[~pos] >= WW_THRESHOLD).mean())
    return out


def wake_words(ctx: Ctx) -> dict[str, Any]:
    models = _oww_dir()
    audio = wake_word_audio(ctx.cache, ctx.quick)
    samples = audio.scored.shape[1]
    logger.info("wake words: %d scored clips, %d calibration clips", len(audio.scored), len(audio.calib))
    mel_f, emb_f, float_scores = _ww_float(models, audio.scored)
    mel_c, emb_c, _ = _ww_float(models, audio.calib[: 12 if ctx.quick else None])
    float_metrics = _ww_scores(float_scores, audio.labels)
    logger.info("wake words float: %s", {k: round(v, 3) for k, v in float_metrics.items()})
    calib_mel = audio.calib[: 12 if ctx.quick else None] * 32767.0
    calib_emb = _mel_windows(mel_c).reshape(-1, 76, 32, 1)
    calib_heads = _head_windows(emb_c).reshape(-1, 16, 96)
    base = {
        "mel": {"target": "hermes", "calibration": {"input": calib_mel}, "input_shapes": {"input": [1, samples]}},
        "emb": {"target": "hermes", "calibration": {"x": calib_emb}, "input_shapes": {"input_1": [1, 76, 32, 1]}},
        "heads": {"target": "hermes", "calibration": {"x": calib_heads}},
    }
    files = {"mel": models / "melspectrogram.onnx", "emb": models / "embedding_model.onnx"}
    compiled_base = {k: _compile(files[k], v) for k, v in base.items() if k in files}
    compiled_base["heads"] = {w: _compile(models / f, base["heads"]) for w, f in WAKE_WORDS.items()}
    result: dict[str, Any] = {"clips": len(audio.scored), "positives_per_word": audio.labels.count("alexa"),
                              "float": float_metrics, "steps": {}}
    keys = list(float_metrics)
    hardened: dict[str, Any] = {}
    for name in ctx.steps:
        step = STEPS[name](ctx.few_rows)
        compiled = {}
        if name in ("harden", "finetune"):
            calib = {"mel": {"input": calib_mel}, "emb": {"input_1": calib_emb}, "heads": {"x": calib_heads}}
            compiled, heads, hardened[name] = _ww_hardened(name, ctx, base, files, compiled_base, calib, hardened)
        for stage in ("mel", "emb") if not compiled else ():
            kw = step.apply(dict(base[stage]), compiled_base[stage])
            compiled[stage] = compiled_base[stage] if kw is None or kw == base[stage] else _compile(files[stage], kw)
        heads = heads if name in ("harden", "finetune") else {}
        for w, f in WAKE_WORDS.items() if name not in ("harden", "finetune") else ():
            kw = step.apply(dict(base["heads"]), compiled_base["heads"][w])
            heads[w] = compiled_base["heads"][w] if kw is None or kw == base["heads"] else _compile(models / f, kw)
        if all(compiled[s] is compiled_base[s] for s in ("mel", "emb")) and all(
                heads[w] is compiled_base["heads"][w] for w in heads) and name != "base":
            logger.info("wake words: step %s changes nothing; skipped", name)
            continue
        rows = []
        started = time.perf_counter()
        for t, k in _chips(ctx):
            mel = _run(compiled["mel"], audio.scored * 32767.0, t, k, ctx)
            win = _mel_windows(mel)
            emb = _run(compiled["emb"], win.reshape(-1, 76, 32, 1), t, k, ctx).reshape(win.shape[0], win.shape[1], 96)
            hw = _head_windows(emb)
            scores = {w: _run(heads[w], hw.reshape(-1, 16, 96), t, k, ctx).reshape(hw.shape[0], hw.shape[1])
                      for w in WAKE_WORDS}
            m = _ww_scores(scores, audio.labels)
            m["embedding cosine"] = float(np.sum(emb * emb_f) / (np.linalg.norm(emb) * np.linalg.norm(emb_f)))
            m["mel rel. error"] = float(np.linalg.norm(mel.reshape(mel_f.shape) - mel_f) / np.linalg.norm(mel_f))
            rows.append({"time": t, "instance": k, **m})
            logger.info("wake words %s %s #%s: %s", name, t, k, {a: round(b, 3) for a, b in m.items()})
        energy = {"mel": _energy(compiled["mel"]), "embedding": _energy(compiled["emb"]),
                  "head": _energy(next(iter(heads.values())))}
        windows = len(range(_mel_windows(mel_f[:1]).shape[1]))
        per_second = {"mel": 1.0 / CLIP_S, "embedding": windows / CLIP_S, "head": len(WAKE_WORDS) * windows / CLIP_S}
        result["steps"][name] = {
            "what": step.what, "metrics": _summarise(rows, keys + ["embedding cosine", "mel rel. error"]),
            "energy": energy, "digital": {s: list(getattr(compiled[s], "digital", ()) or ()) for s in compiled},
            "energy_per_second_j": sum(energy[s]["energy_per_inference_j"] * per_second[s] for s in energy),
            "wall_s": time.perf_counter() - started,
            **({"hardened": {k: v for k, v in hardened[name].items() if not k.startswith("_")}}
               if name in hardened else {}),
        }
    return result


def _split(data: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Calibration windows halved, interleaved: harden measures on one half and maps again with the other."""
    return {k: v[0::2] for k, v in data.items()}, {k: v[1::2] for k, v in data.items()}


def _harden_stage(compiled: Any, stage: str, calib: dict[str, np.ndarray], ctx: Ctx) -> tuple[Any, dict[str, Any]]:
    import cimc

    measure_on, map_with = _split(calib)
    n = min(len(next(iter(measure_on.values()))), 24 if stage == "mel" else 256)
    res = cimc.harden(compiled, {k: v[:n] for k, v in measure_on.items()}, calibration=map_with, time="24h",
                      metric=HARDEN_METRIC[stage], instances=2, seed=ctx.seed, max_rounds=ctx.harden_rounds, max_trials=6)
    summary = {"metric": res.data["metric"], "kept": res.data["kept"], "stopped": res.data["stopped"],
               "start": res.data["steps"][0]["measurement"]["value"], "final": res.data["final"]["value"]}
    logger.info("harden %s: %s", stage, summary)
    return res.compiled, summary


def _ww_training(ctx: Ctx) -> dict[str, np.ndarray]:
    """Embedding-model inputs for fine-tuning: phrases spoken by the calibration voices only (never a scored
    voice, phrase set or clip), through the float mel model."""
    rng = np.random.default_rng(99)
    clips = [_clip(_espeak(p, v, speed, pitch, ctx.cache), rng, earliest_s=WW_EARLIEST_S)
             for p in FT_PHRASES[: 6 if ctx.quick else None] for v in CALIB_VOICES
             for speed, pitch in ((140, 40), (175, 60))]
    clips.extend(_noise_clips(16, rng))
    mel, _, _ = _ww_float(_oww_dir(), np.stack(clips), heads=False)
    return {"input_1": _mel_windows(mel).reshape(-1, 76, 32, 1)}


def _ww_hardened(name: str, ctx: Ctx, base: dict[str, Any], files: dict[str, Path], compiled_base: dict[str, Any],
                 calib: dict[str, dict[str, np.ndarray]], done: dict[str, Any]
                 ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Every stage through cimc.harden ('harden'); or the embedding fine-tuned first ('finetune', reusing the
    mel and heads of 'harden' when it ran). Returns the compiled stages, the heads and what harden kept."""
    import cimc

    summary: dict[str, Any] = {}
    if name == "finetune" and "harden" in done:
        compiled, heads = done["harden"]["_compiled"]
        summary.update({k: v for k, v in done["harden"].items() if k not in ("_compiled", "emb")})
    else:
        compiled, heads = {}, {}
        compiled["mel"], summary["mel"] = _harden_stage(compiled_base["mel"], "mel", calib["mel"], ctx)
        for w in WAKE_WORDS:
            heads[w], summary[f"head {w}"] = _harden_stage(compiled_base["heads"][w], "heads", calib["heads"], ctx)
    emb_base = compiled_base["emb"]
    if name == "finetune":
        from cimc.data import Dataset

        train = _ww_training(ctx)
        started = time.perf_counter()
        tuned, history = cimc.finetune(files["emb"], "hermes", Dataset(train["input_1"], None, "speech"), None,
                                       input_shapes=base["emb"]["input_shapes"], seed=ctx.seed, **FT_RECIPE)
        summary["finetune"] = {"recipe": FT_RECIPE, "windows": len(train["input_1"]),
                               "best_epoch": history.get("best_epoch"), "kept": history.get("kept"),
                               "wall_s": time.perf_counter() - started}
        logger.info("finetune emb: %s", summary["finetune"])
        tuned_path = ctx.out / "embedding_model.finetuned.onnx"
        from cimc.passes.finetune import save_finetuned

        save_finetuned(tuned, tuned_path, force=True)
        emb_base = _compile(tuned_path, base["emb"])
    compiled["emb"], summary["emb"] = _harden_stage(emb_base, "emb", calib["emb"], ctx)
    summary["_compiled"] = (dict(compiled), dict(heads))
    return compiled, heads, summary


# --- VAD
def _silero() -> Path:
    return _package_path("silero_vad", "silero-vad==6.2.3", "data", "silero_vad.onnx")


def _vad_chunks(audio: np.ndarray) -> np.ndarray:
    """[clips, chunks, 576]: each 512-sample chunk after the 64 samples before it (zeros at the start), as the
    package's wrapper feeds the model."""
    n = audio.shape[1] // VAD_CHUNK
    padded = np.concatenate([np.zeros((audio.shape[0], VAD_CONTEXT), np.float32), audio], axis=1)
    return np.stack([padded[:, c * VAD_CHUNK : c * VAD_CHUNK + VAD_CHUNK + VAD_CONTEXT] for c in range(n)], axis=1)


def _vad_float(path: Path, chunks: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    probs = np.zeros(chunks.shape[:2], np.float32)
    for s in range(chunks.shape[0]):
        state = np.zeros((2, 1, 128), np.float32)
        for c in range(chunks.shape[1]):
            out, state = sess.run(None, {"input": chunks[s, c][None], "state": state, "sr": np.array(RATE)})
            probs[s, c] = out[0, 0]
    return probs


def _vad_scores(probs: np.ndarray, labels: list[str]) -> dict[str, float]:
    speech = np.array([lab == "speech" for lab in labels])
    peak = probs.max(axis=1)
    return {"speech max-prob mean": float(peak[speech].mean()), "noise prob mean": float(probs[~speech].mean()),
            "noise max-prob mean": float(peak[~speech].mean()),
            "auc (clip max)": roc_auc(peak, speech)}


def vad(ctx: Ctx) -> dict[str, Any]:
    path = _silero()
    audio = vad_audio(ctx.cache, ctx.quick)
    chunks = _vad_chunks(audio.scored)
    calib_chunks = _vad_chunks(audio.calib)
    logger.info("vad: %d scored clips x %d chunks, %d calibration clips", *chunks.shape[:2], len(audio.calib))
    float_probs = _vad_float(path, chunks)
    float_metrics = _vad_scores(float_probs, audio.labels)
    logger.info("vad float: %s", {k: round(v, 3) for k, v in float_metrics.items()})
    fixed = {"input_shapes": {"input": [1, VAD_CHUNK + VAD_CONTEXT], "state": [2, 1, 128]},
             "input_values": {"sr": RATE}}
    flat = calib_chunks.reshape(-1, VAD_CHUNK + VAD_CONTEXT)
    base = {"target": "hermes", **fixed,
            # before streams: the state frozen to zeros for calibration (the only way a one-input path allowed)
            "calibration": {"input": flat, "state": np.zeros((2, len(flat), 128), np.float32)},
            "_states": {"calibration": {"input": calib_chunks}, "stream": "auto"}}
    compiled_base = _compile(path, base)
    result: dict[str, Any] = {"clips": len(audio.scored), "chunks": int(chunks.shape[1]), "float": float_metrics,
                              "steps": {}}
    keys = list(float_metrics) + ["prob rel. error"]
    applied: dict[str, Any] = {}
    for name in ctx.steps:
        step = STEPS[name](ctx.few_rows)
        start_from = dict(applied.get("states", base))  # later steps build on the real-state calibration
        kw = step.apply(dict(base if name in ("base", "states") else start_from),
                        applied.get("states_compiled", compiled_base))
        if kw is None:
            logger.info("vad: step %s changes nothing; skipped", name)
            continue
        compiled = compiled_base if name == "base" else _compile(path, kw)
        if name == "states":
            applied["states"], applied["states_compiled"] = kw, compiled
        rows = []
        started = time.perf_counter()
        for t, k in _chips(ctx):
            probs = _run(compiled, {"input": chunks}, t, k, ctx, stream="auto").reshape(chunks.shape[:2])
            m = _vad_scores(probs, audio.labels)
            m["prob rel. error"] = float(np.linalg.norm(probs - float_probs) / np.linalg.norm(float_probs))
            rows.append({"time": t, "instance": k, **m})
            logger.info("vad %s %s #%s: %s", name, t, k, {a: round(b, 3) for a, b in m.items()})
        result["steps"][name] = {"what": step.what, "metrics": _summarise(rows, keys), "energy": _energy(compiled),
                                 "energy_per_second_j": _energy(compiled)["energy_per_inference_j"] * RATE / VAD_CHUNK,
                                 "wall_s": time.perf_counter() - started}
    return result


# --- digits
def _digits_model(out: Path, seed: int) -> tuple[Path, dict[str, np.ndarray]]:
    """A small CNN trained on scikit-learn's digits (first 1,297 for training, the last 500 scored), exported
    to ONNX: the corpus's image classifier at a size that fits aon-cim."""
    import torch
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3, padding=1),
        torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(32 * 16, 64), torch.nn.ReLU(),
        torch.nn.Linear(64, 10))
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    xt, yt = torch.from_numpy(x[:1297]), torch.from_numpy(y[:1297])
    for _ in range(25):
        for i in range(0, len(xt), 64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(xt[i : i + 64]), yt[i : i + 64]).backward()
            opt.step()
    path = out / "digits_cnn.onnx"
    torch.onnx.export(net.eval(), (torch.zeros(1, 1, 8, 8),), str(path), input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}}, dynamo=False)
    return path, {"train": x[:1297], "test_x": x[1297:], "test_y": y[1297:]}


def digits(ctx: Ctx) -> dict[str, Any]:
    path, data = _digits_model(ctx.out, ctx.seed)
    logits = _ort(path, {"x": data["test_x"]})
    float_acc = float((logits.argmax(1) == data["test_y"]).mean())
    base = {"target": "aon-cim", "calibration": {"x": data["train"][:256]}}
    compiled_base = _compile(path, base)
    result: dict[str, Any] = {"samples": len(data["test_y"]), "float": {"accuracy": float_acc}, "steps": {}}
    for name in ctx.steps:
        step = STEPS[name](ctx.few_rows)
        kw = step.apply(dict(base), compiled_base)
        if kw is None or (name != "base" and kw == base):
            continue
        compiled = compiled_base if name == "base" else _compile(path, kw)
        rows = []
        for t, k in _chips(ctx):
            out = _run(compiled, data["test_x"], t, k, ctx)
            rows.append({"time": t, "instance": k, "accuracy": float((out.argmax(1) == data["test_y"]).mean())})
        result["steps"][name] = {"what": step.what, "metrics": _summarise(rows, ["accuracy"]),
                                 "energy": _energy(compiled)}
    return result


# ------------------------------------------------------------------------------------------------ report
def _table(name: str, res: dict[str, Any], keys: Sequence[str], times: Sequence[str]) -> str:
    head = ["step", "metric", "float", "ideal"] + [f"{t} mean (min)" for t in times] + ["energy/inference"]
    lines = [f"### {name}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for step, s in res["steps"].items():
        energy = s["energy"]
        e = (energy["energy_per_inference_j"] if "energy_per_inference_j" in energy
             else sum(v["energy_per_inference_j"] for v in energy.values()))
        for k in keys:
            cells = [step, k, f"{res['float'].get(k, float('nan')):.3f}", f"{s['metrics']['ideal'][k]['mean']:.3f}"]
            cells += [f"{s['metrics'][t][k]['mean']:.3f} ({s['metrics'][t][k]['min']:.3f})" for t in times]
            cells.append(f"{e * 1e6:.3g} µJ")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plot(results: dict[str, Any], times: Sequence[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    if "wake_words" in results:
        panels += [("wake words", results["wake_words"], f"{w}: auc") for w in WAKE_WORDS]
    if "vad" in results:
        panels += [("vad", results["vad"], "speech max-prob mean"), ("vad", results["vad"], "noise prob mean")]
    if "digits" in results:
        panels.append(("digits", results["digits"], "accuracy"))
    if not panels:
        return
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    x = ["ideal", *times]
    for ax, (model, res, key) in zip(axes.flat, panels):
        for step, s in res["steps"].items():
            ax.plot(x, [s["metrics"][t][key]["mean"] for t in x], marker="o", label=step)
        ax.axhline(res["float"][key], color="k", ls="--", lw=0.8, label="float")
        ax.set_title(f"{model}: {key}", fontsize=9)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", default="real-models-on-chip", help="output folder")
    parser.add_argument("--cache", default=".cache/real-models-on-chip", help="synthesised audio cache (not in git)")
    parser.add_argument("--only", default="wake_words,vad,digits", help="which models (comma-separated)")
    parser.add_argument("--steps", default="base,states,digital,percentile,column", help="which steps, in order")
    parser.add_argument("--times", default="1s,24h,1y")
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument("--few-rows", type=int, default=32, help="the digital step keeps layers of <= N rows digital")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="fewer voices and clips (a smoke run)")
    parser.add_argument("--harden-rounds", type=int, default=2, help="step 'harden': diagnose-and-try rounds per stage")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("cimc").setLevel(logging.WARNING)
    if shutil.which("espeak-ng") is None:
        raise SystemExit("espeak-ng is not installed: apt-get install -y espeak-ng")
    import torch

    torch.set_num_threads(1)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    steps = [s for s in args.steps.split(",") if s]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise SystemExit(f"unknown step(s) {unknown}; known: {', '.join(STEPS)}")
    ctx = Ctx(times=args.times.split(","), instances=args.instances, seed=args.seed, out=out, cache=Path(args.cache),
              quick=args.quick, few_rows=args.few_rows, steps=steps,
              harden_rounds=args.harden_rounds)
    runners = {"wake_words": wake_words, "vad": vad, "digits": digits}
    results: dict[str, Any] = {"command": " ".join(["python benchmarks/real_models_on_chip.py", *(argv or sys.argv[1:])]),
                               "instances": args.instances, "times": ctx.times}
    md = []
    for name in args.only.split(","):
        started = time.perf_counter()
        results[name] = runners[name](ctx)
        results[name]["wall_s"] = time.perf_counter() - started
        keys = list(results[name]["float"])
        md.append(_table(name, results[name], keys, ctx.times))
        (out / "results.json").write_text(json.dumps(results, indent=1, default=float))
        (out / "results.md").write_text("\n".join(md))
        _plot(results, ctx.times, out / "real_models_on_chip.png")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
