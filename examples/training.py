"""Shared training loop of the examples: seeded, AdamW + cosine learning-rate schedule, per-epoch log."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

__all__ = ["accuracy", "seed_everything", "train"]

logger = logging.getLogger(__name__)

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def seed_everything(seed: int, threads: int = 2) -> torch.Generator:
    """Seed torch and numpy, pin the thread count (the machine is shared); returns a torch generator."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 500) -> float:
    """Top-1 accuracy of ``model`` (eval mode) on numpy arrays."""
    model.eval()
    correct = 0
    for start in range(0, len(y), batch_size):
        logits = model(torch.from_numpy(x[start : start + batch_size]))
        correct += int((logits.argmax(1).numpy() == y[start : start + batch_size]).sum())
    return correct / len(y)


def train(
    model: nn.Module,
    train_xy: tuple[np.ndarray, np.ndarray],
    val_xy: tuple[np.ndarray, np.ndarray] | None,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    generator: torch.Generator,
    augment: Augment | None = None,
    label_smoothing: float = 0.0,
) -> dict[str, float]:
    """Train in place; keeps the weights of the epoch with the best validation accuracy.

    Without validation data (``val_xy=None``) the last epoch's weights are kept.
    """
    x_train = torch.from_numpy(train_xy[0])
    y_train = torch.from_numpy(train_xy[1])
    steps_per_epoch = (len(y_train) + batch_size - 1) // batch_size
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.15, anneal_strategy="cos"
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    best = {"val_acc": -1.0, "epoch": 0}
    best_state: dict[str, torch.Tensor] = {}
    for epoch in range(1, epochs + 1):
        model.train()
        t0 = time.perf_counter()
        order = torch.randperm(len(y_train), generator=generator)
        total_loss = 0.0
        for step in range(steps_per_epoch):
            idx = order[step * batch_size : (step + 1) * batch_size]
            xb = x_train[idx]
            if augment is not None:
                xb = augment(xb, generator)
            loss = loss_fn(model(xb), y_train[idx])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            total_loss += float(loss.detach()) * len(idx)
        val_acc = accuracy(model, *val_xy) if val_xy is not None else float("nan")
        print(
            f"epoch {epoch:2d}/{epochs}: loss {total_loss / len(y_train):.4f}  val acc {val_acc:.4f}  "
            f"({time.perf_counter() - t0:.1f} s)",
            flush=True,
        )
        if val_xy is None or val_acc > best["val_acc"]:
            best = {"val_acc": val_acc, "epoch": epoch}
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    model.eval()
    return best
