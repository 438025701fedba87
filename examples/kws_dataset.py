"""Keyword-spotting dataset synthesised offline with espeak-ng (deterministic, seeded).

Twelve classes, in the order of ``cimc.builtin.KWS_LABELS``: silence, unknown, and the ten commands
yes, no, up, down, left, right, on, off, stop, go. Each sample is one second of 16 kHz audio: a word
spoken by one espeak-ng voice (one of 8 English accents combined with one of ~100 voice variants, at a
random speed and pitch), placed at a random offset, mixed with background noise (white, pink, brown or
babble made of other words) at an SNR uniform in 3-30 dB. "silence" is noise only (white, pink or brown,
at -70 to -20 dBFS RMS); "unknown" is one of 30 other words.

Splits are by voice **variant**: the variants of the test split are heard neither in training nor in
validation (in any accent), so test accuracy measures generalisation to unseen voices.

Features: 49 x 10 MFCC per clip (40 ms Hann windows, 20 ms hop, 1024-point FFT, 40 HTK-mel filters
from 20 Hz to 4 kHz, natural log of (mel energy + 1e-6), orthonormal DCT-II, first 10 coefficients),
then **normalised in the dataset** with fixed per-coefficient constants (``MFCC_MEAN``, ``MFCC_STD``,
measured once on a seed-0 training split, rounded, and frozen here: x = (mfcc - mean) / std). The ONNX models take these normalised features as they are:
nothing is folded into the model. ``x`` has shape ``[N, 1, 49, 10]``.

Every random draw of sample ``i`` of split ``s`` comes from a generator seeded with ``(seed, s, i)``,
so a split is reproduced bit for bit whatever the batching or number of workers.

Usage: ``python examples/kws_dataset.py --out build/kws --seed 0 [--splits test]``
Requires espeak-ng (Debian/Ubuntu: ``apt-get install -y espeak-ng``).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "ACCENTS",
    "COMMANDS",
    "LABELS",
    "MFCC_MEAN",
    "MFCC_STD",
    "SAMPLE_RATE_HZ",
    "SPLIT_SIZES",
    "UNKNOWN_WORDS",
    "VARIANTS",
    "EspeakMissingError",
    "generate",
    "generate_split",
    "main",
    "mfcc",
    "require_espeak",
    "split_variants",
]

logger = logging.getLogger(__name__)

# fmt: off
COMMANDS: tuple[str, ...] = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
LABELS: tuple[str, ...] = ("silence", "unknown", *COMMANDS)
UNKNOWN_WORDS: tuple[str, ...] = (
    "bed", "bird", "cat", "dog", "happy", "house", "marvin", "sheila", "tree", "wow",
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    "learn", "follow", "forward", "backward", "visual", "yellow", "window", "water", "morning", "table",
)
# espeak-ng 1.51 English accents with their own phoneme rules (the mbrola "mb/" voices need extra packages).
ACCENTS: tuple[str, ...] = (
    "en-gb", "en-us", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-gb-x-gbcwmd", "en-029", "en-us-nyc",
)
# espeak-ng voice variants (``espeak-ng --voices=variant``); "" is the accent's default voice.
# Fixed here because espeak-ng silently falls back to its default voice for an unknown variant.
VARIANTS: tuple[str, ...] = (
    "", "adam", "Alex", "Alicia", "Andrea", "Andy", "Annie", "antonio", "aunty", "belinda", "benjamin",
    "boris", "caleb", "david", "Demonic", "Denis", "Diogo", "ed", "edward", "edward2", "Gene", "Gene2",
    "gustave", "announcer", "Henrique", "Hugo", "iven", "iven2", "iven3", "iven4", "Jacky", "john",
    "kaukovalta", "Lee", "linda", "marcelo", "Marco", "Mario", "max", "Michael", "michel", "miguel",
    "Mike", "Mr", "Nguyen", "pablo", "paul", "pedro", "quincy", "RicishayMax", "RicishayMax2",
    "RicishayMax3", "rob", "robert", "robosoft", "robosoft2", "robosoft3", "robosoft4", "robosoft5",
    "robosoft6", "robosoft7", "robosoft8", "steph", "steph2", "steph3", "Storm", "Tweaky", "UniRobot",
    "zac", "anika", "anikaRobot", "AnxiousAndy", "f1", "f2", "f3", "f4", "f5", "whisperf", "grandpa",
    "klatt", "klatt2", "klatt3", "klatt4", "klatt5", "klatt6", "m1", "m2", "m3", "m4", "m5", "m6", "m7",
    "m8", "norbert", "sandro", "shelby", "travis", "victor", "whisper", "croak", "grandma",
)
# fmt: on
SPLITS: tuple[str, ...] = ("train", "val", "test")
SPLIT_SIZES: dict[str, int] = {"train": 12000, "val": 1200, "test": 1200}
_TEST_VARIANTS_N = 16
_VAL_VARIANTS_N = 12
_SPLIT_VARIANT_SEED = 20240501  # the voice split is fixed, independent of --seed

SAMPLE_RATE_HZ = 16000
_ESPEAK_RATE_HZ = 22050
_CLIP_SAMPLES = SAMPLE_RATE_HZ  # 1 s clips
_MAX_RAW_SAMPLES = 441 * 100  # 2 s at 22.05 kHz, a multiple of 441 for the exact 441 -> 320 resampling
_BABBLE_POOL = 48
_SNR_MIN_DB = 3.0  # speech-to-noise ratio range of the word classes
_SNR_MAX_DB = 30.0
_WIN_SAMPLES = 640  # 40 ms
_HOP_SAMPLES = 320  # 20 ms
_N_FFT = 1024
_N_MELS = 40
_N_MFCC = 10
_N_FRAMES = 1 + (_CLIP_SAMPLES - _WIN_SAMPLES) // _HOP_SAMPLES  # 49
_MEL_LOW_HZ = 20.0
_MEL_HIGH_HZ = 4000.0
_LOG_FLOOR = 1e-6

# Per-coefficient normalisation, measured on the seed-0 training split (see module docstring).
MFCC_MEAN = np.array([-22.45, 5.33, 1.73, -0.83, -0.59, -0.03, -0.21, 0.13, 0.08, 0.03], dtype=np.float32)
MFCC_STD = np.array([25.95, 7.10, 4.04, 4.33, 3.38, 2.81, 2.44, 2.04, 1.90, 1.79], dtype=np.float32)


class EspeakMissingError(RuntimeError):
    """espeak-ng is not installed."""


def require_espeak() -> str:
    """Path of the espeak-ng binary, or EspeakMissingError with the install command."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise EspeakMissingError(
            "espeak-ng not found: install it (Debian/Ubuntu: apt-get install -y espeak-ng) and run again"
        )
    return exe


def split_variants() -> dict[str, tuple[str, ...]]:
    """Voice variants of each split (disjoint): test and val variants are never heard in training."""
    order = np.random.default_rng(_SPLIT_VARIANT_SEED).permutation(len(VARIANTS))
    names = [VARIANTS[i] for i in order]
    test = tuple(names[:_TEST_VARIANTS_N])
    val = tuple(names[_TEST_VARIANTS_N : _TEST_VARIANTS_N + _VAL_VARIANTS_N])
    train = tuple(names[_TEST_VARIANTS_N + _VAL_VARIANTS_N :])
    return {"train": train, "val": val, "test": test}


@dataclass(frozen=True)
class _Utterance:
    """One espeak-ng call: word and voice settings."""

    word: str
    voice: str
    speed_wpm: int
    pitch: int


def _draw_utterance(rng: np.random.Generator, word: str, variants: tuple[str, ...]) -> _Utterance:
    accent = ACCENTS[rng.integers(len(ACCENTS))]
    variant = variants[rng.integers(len(variants))]
    voice = f"{accent}+{variant}" if variant else accent
    return _Utterance(word, voice, int(rng.integers(110, 231)), int(rng.integers(15, 86)))


def _synthesise(exe: str, utt: _Utterance) -> np.ndarray:
    """int16 samples at 22.05 kHz of one word."""
    cmd = [exe, "--stdout", "-v", utt.voice, "-s", str(utt.speed_wpm), "-p", str(utt.pitch), utt.word]
    wav = subprocess.run(cmd, check=True, capture_output=True).stdout
    data_at = wav.find(b"data")
    if data_at < 0:
        raise RuntimeError(f"espeak-ng returned no audio for {utt}")
    return np.frombuffer(wav[data_at + 8 :], dtype="<i2")


def _synthesise_all(utts: list[_Utterance], workers: int) -> np.ndarray:
    """Raw clips, zero-padded/cropped to ``_MAX_RAW_SAMPLES``, as a float64 array [N, _MAX_RAW_SAMPLES]."""
    exe = require_espeak()
    # Threads suffice: the work happens in the espeak-ng subprocesses.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        raws = list(pool.map(lambda u: _synthesise(exe, u), utts))
    out = np.zeros((len(utts), _MAX_RAW_SAMPLES), dtype=np.float64)
    for row, raw in zip(out, raws):
        n = min(len(raw), _MAX_RAW_SAMPLES)
        row[:n] = raw[:n] / 32768.0
    return out


def _resample_to_16k(raw: np.ndarray) -> np.ndarray:
    """Band-limited 22.05 kHz -> 16 kHz (ratio 320/441) by FFT truncation; [N, L] -> [N, L*320/441]."""
    n_in = raw.shape[1]
    n_out = n_in * 320 // 441
    spectrum = np.fft.rfft(raw, axis=1)[:, : n_out // 2 + 1]
    return np.fft.irfft(spectrum, n=n_out, axis=1) * (n_out / n_in)


def _trim(clip: np.ndarray) -> np.ndarray:
    """The clip without its leading and trailing silence (espeak-ng pads words with silence)."""
    loud = np.flatnonzero(np.abs(clip) > 0.02 * (np.abs(clip).max() + 1e-12))
    if loud.size == 0:
        return clip[:1]
    return clip[loud[0] : loud[-1] + 1]


def _coloured_noise(rng: np.random.Generator, kind: str, n: int) -> np.ndarray:
    """Unit-RMS white, pink (1/f power) or brown (1/f^2 power) noise."""
    white = rng.standard_normal(n)
    if kind != "white":
        freqs = np.fft.rfftfreq(n, d=1.0 / SAMPLE_RATE_HZ)
        freqs[0] = freqs[1]
        exponent = 0.5 if kind == "pink" else 1.0
        white = np.fft.irfft(np.fft.rfft(white) / freqs**exponent, n=n)
    return white / (np.sqrt(np.mean(white**2)) + 1e-12)


def _babble(rng: np.random.Generator, pool: np.ndarray) -> np.ndarray:
    """Unit-RMS babble: 3-6 words of the pool, each at a random offset and level."""
    out = np.zeros(_CLIP_SAMPLES)
    for _ in range(int(rng.integers(3, 7))):
        word = _trim(pool[rng.integers(len(pool))])[:_CLIP_SAMPLES]
        start = int(rng.integers(0, _CLIP_SAMPLES - len(word) + 1))
        out[start : start + len(word)] += word * rng.uniform(0.3, 1.0)
    return out / (np.sqrt(np.mean(out**2)) + 1e-12)


def _noise(rng: np.random.Generator, pool: np.ndarray, babble: bool) -> np.ndarray:
    kinds = ("white", "pink", "brown", "babble") if babble else ("white", "pink", "brown")
    kind = kinds[rng.integers(len(kinds))]
    if kind == "babble":
        return _babble(rng, pool)
    return _coloured_noise(rng, kind, _CLIP_SAMPLES)


def _mix(rng: np.random.Generator, word: np.ndarray | None, pool: np.ndarray) -> np.ndarray:
    """One 1 s clip: the word (if any) at a random offset and level, plus noise at a random SNR."""
    # Silence gets no babble: babble is speech, and a clip of only speech is not silence.
    noise = _noise(rng, pool, babble=word is not None)
    if word is None:  # silence: noise only, at a level from barely audible to loud
        return noise * 10.0 ** rng.uniform(-3.5, -1.0)
    word = _trim(word)[:_CLIP_SAMPLES]
    word = word / (np.abs(word).max() + 1e-12) * rng.uniform(0.1, 0.9)
    clip = np.zeros(_CLIP_SAMPLES)
    start = int(rng.integers(0, _CLIP_SAMPLES - len(word) + 1))
    clip[start : start + len(word)] = word
    snr_db = rng.uniform(_SNR_MIN_DB, _SNR_MAX_DB)
    speech_rms = np.sqrt(np.mean(word**2)) * np.sqrt(len(word) / _CLIP_SAMPLES)
    return clip + noise * speech_rms * 10.0 ** (-snr_db / 20.0)


def _mel_filterbank() -> np.ndarray:
    """[n_fft/2+1, 40] triangular HTK-mel filters between 20 Hz and 4 kHz."""

    def hz_to_mel(f):
        return 2595.0 * np.log10(1.0 + f / 700.0)

    def mel_to_hz(m):
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)

    edges_hz = mel_to_hz(np.linspace(hz_to_mel(_MEL_LOW_HZ), hz_to_mel(_MEL_HIGH_HZ), _N_MELS + 2))
    bins_hz = np.fft.rfftfreq(_N_FFT, d=1.0 / SAMPLE_RATE_HZ)[:, None]
    lower, centre, upper = edges_hz[:-2], edges_hz[1:-1], edges_hz[2:]
    rising = (bins_hz - lower) / (centre - lower)
    falling = (upper - bins_hz) / (upper - centre)
    return np.clip(np.minimum(rising, falling), 0.0, None)


def _dct_matrix() -> np.ndarray:
    """[40, 10] orthonormal DCT-II basis (first 10 coefficients)."""
    n = np.arange(_N_MELS)[:, None]
    k = np.arange(_N_MFCC)[None, :]
    basis = np.cos(np.pi / _N_MELS * (n + 0.5) * k) * np.sqrt(2.0 / _N_MELS)
    basis[:, 0] /= np.sqrt(2.0)
    return basis


def mfcc(audio: np.ndarray) -> np.ndarray:
    """Raw (un-normalised) MFCC of 1 s clips: [N, 16000] float -> [N, 49, 10] float64."""
    frames = np.lib.stride_tricks.sliding_window_view(audio, _WIN_SAMPLES, axis=1)[:, ::_HOP_SAMPLES]
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(_WIN_SAMPLES) / _WIN_SAMPLES)  # periodic Hann
    power = np.abs(np.fft.rfft(frames * window, n=_N_FFT, axis=-1)) ** 2
    log_mel = np.log(power @ _mel_filterbank() + _LOG_FLOOR)
    return log_mel @ _dct_matrix()


def _sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS.index(split), index])


def _babble_pool(seed: int, split: str, variants: tuple[str, ...], workers: int) -> np.ndarray:
    """16 kHz clips of unknown words spoken by the split's own voices, the material of babble noise."""
    rng = np.random.default_rng([seed, SPLITS.index(split), 1_000_000_007])
    utts = [
        _draw_utterance(rng, UNKNOWN_WORDS[rng.integers(len(UNKNOWN_WORDS))], variants) for _ in range(_BABBLE_POOL)
    ]
    return _resample_to_16k(_synthesise_all(utts, workers))


def _plan(seed: int, split: str, index: int, variants: tuple[str, ...]) -> tuple[int, _Utterance | None]:
    """Label and utterance (None for silence) of one sample; classes cycle so every split is balanced."""
    label = index % len(LABELS)
    rng = _sample_rng(seed, split, index)
    if LABELS[label] == "silence":
        return label, None
    word = UNKNOWN_WORDS[rng.integers(len(UNKNOWN_WORDS))] if LABELS[label] == "unknown" else LABELS[label]
    return label, _draw_utterance(rng, word, variants)


def _render_chunk(
    seed: int, split: str, indices: range, variants: tuple[str, ...], pool: np.ndarray, workers: int
) -> tuple[np.ndarray, np.ndarray]:
    plans = [_plan(seed, split, i, variants) for i in indices]
    utts = [u for _, u in plans if u is not None]
    words = iter(_resample_to_16k(_synthesise_all(utts, workers))) if utts else iter(())
    audio = np.empty((len(plans), _CLIP_SAMPLES))
    for row, i, (_, utt) in zip(range(len(plans)), indices, plans):
        # A second stream (offset 2^31) keeps the mixing draws apart from the utterance draws.
        rng = np.random.default_rng([seed, SPLITS.index(split), i, 2**31])
        audio[row] = _mix(rng, None if utt is None else next(words), pool)
    labels = np.array([label for label, _ in plans], dtype=np.int64)
    return audio, labels


def generate_split(
    split: str, seed: int = 0, n: int | None = None, workers: int = 2, chunk: int = 600
) -> tuple[np.ndarray, np.ndarray]:
    """Normalised features ``x`` [N, 1, 49, 10] float32 and labels ``y`` [N] int64 of one split."""
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}': use one of {SPLITS}")
    require_espeak()
    n = SPLIT_SIZES[split] if n is None else n
    variants = split_variants()[split]
    pool = _babble_pool(seed, split, variants, workers)
    xs, ys = [], []
    for start in range(0, n, chunk):
        audio, labels = _render_chunk(seed, split, range(start, min(start + chunk, n)), variants, pool, workers)
        xs.append(mfcc(audio).astype(np.float32))
        ys.append(labels)
    feats = np.concatenate(xs)
    x = ((feats - MFCC_MEAN) / MFCC_STD).astype(np.float32)[:, None, :, :]
    return x, np.concatenate(ys)


def generate(out_dir: str | Path, seed: int = 0, splits: tuple[str, ...] = SPLITS, workers: int = 2) -> dict[str, Path]:
    """Write ``kws_<split>.npz`` for each split to ``out_dir``; returns the paths."""
    from cimc.data import save_dataset

    out = Path(out_dir)
    paths = {}
    for split in splits:
        t0 = time.perf_counter()
        x, y = generate_split(split, seed=seed, workers=workers)
        paths[split] = save_dataset(out / f"kws_{split}.npz", x, y)
        print(f"{split}: {len(y)} samples -> {paths[split]} ({time.perf_counter() - t0:.1f} s)", flush=True)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder for kws_{train,val,test}.npz")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--splits", default=",".join(SPLITS), help="comma-separated subset of train,val,test")
    parser.add_argument("--workers", type=int, default=2, help="parallel espeak-ng processes")
    args = parser.parse_args(argv)
    try:
        generate(args.out, args.seed, tuple(s for s in args.splits.split(",") if s), args.workers)
    except EspeakMissingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
