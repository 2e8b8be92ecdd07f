"""Training one classifier in torch: a softmax logistic regression or a one-hidden-layer MLP
over stored vectors, seeded, class-weighted, with a stratified holdout and its metrics."""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

KINDS = ("logistic", "mlp")
# Rows per optimiser step, and rows per forward pass when predicting or evaluating.
PREDICT_CHUNK = 8192


class TrainingStopped(Exception):
    """Training was cancelled or ran past its time limit (``reason`` says which)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class TrainOptions:
    """How to train (each has a default; the README lists them)."""

    holdout: float = 0.2
    epochs: int = 30
    seed: int = 0
    hidden: int = 256  # mlp only
    lr: float = 0.01
    batch_size: int = 256
    weight_decay: float = 1e-4

    def as_dict(self) -> dict[str, Any]:
        return {"holdout": self.holdout, "epochs": self.epochs, "seed": self.seed,
                "hidden": self.hidden, "lr": self.lr, "batch_size": self.batch_size,
                "weight_decay": self.weight_decay}


class Standardize(nn.Module):
    """(x - mean) / std with the training split's statistics, kept in the weights."""

    mean: torch.Tensor
    scale: torch.Tensor

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) * self.scale


def build(kind: str, dim: int, classes: int, hidden: int) -> nn.Sequential:
    """The network of ``kind``: standardised inputs, then linear logits (logistic), or a
    ReLU hidden layer and linear logits (mlp)."""
    if kind == "logistic":
        return nn.Sequential(Standardize(dim), nn.Linear(dim, classes))
    return nn.Sequential(Standardize(dim), nn.Linear(dim, hidden), nn.ReLU(),
                         nn.Linear(hidden, classes))


def for_inference(net: nn.Sequential) -> nn.Sequential:
    """The same function with the standardisation folded into the first linear layer
    (W' = W * scale, b' = b - W' @ mean): prediction is then one GEMM per layer, with no
    standardised copy of the inputs."""
    standardize, first, *rest = list(net)
    assert isinstance(standardize, Standardize) and isinstance(first, nn.Linear)
    folded = nn.Linear(first.in_features, first.out_features).to(first.weight.device)
    with torch.no_grad():
        weight = first.weight * standardize.scale
        folded.weight.copy_(weight)
        folded.bias.copy_(first.bias - weight @ standardize.mean)
    return nn.Sequential(folded, *rest).eval()


def to_bytes(net: nn.Module) -> bytes:
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, buf)
    return buf.getvalue()


def from_bytes(kind: str, dim: int, classes: int, hidden: int, blob: bytes,
               device: torch.device) -> nn.Sequential:
    """A stored network, ready for inference (weights only: torch.load never unpickles code)."""
    net = build(kind, dim, classes, hidden)
    state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    return net.to(device).eval()  # for_inference(...) of it is what predicts


def split(y: npt.NDArray[np.int64], classes: int, holdout: float,
          gen: torch.Generator) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Stratified (train, holdout) row indices: about ``holdout`` of each class held out,
    at least one row of each class kept for training."""
    train: list[npt.NDArray[np.int64]] = []
    held: list[npt.NDArray[np.int64]] = []
    for c in range(classes):
        rows = np.flatnonzero(y == c)
        rows = rows[torch.randperm(len(rows), generator=gen).numpy()]
        n_held = min(len(rows) - 1, round(holdout * len(rows)))
        held.append(rows[:n_held])
        train.append(rows[n_held:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


def predict_proba(net: nn.Module, x: npt.NDArray[np.float32] | torch.Tensor,
                  device: torch.device) -> npt.NDArray[np.float32]:
    """Class probabilities (n, C) float32, batched on ``device``."""
    out: list[npt.NDArray[np.float32]] = []
    with torch.inference_mode():
        for start in range(0, len(x), PREDICT_CHUNK):
            part = x[start:start + PREDICT_CHUNK]
            batch = part if isinstance(part, torch.Tensor) else torch.from_numpy(
                np.require(part, np.float32, ["C", "W"]))
            # Finite probabilities for any finite input: logits that overflowed (absurd
            # magnitudes: inf - inf) count as 0, and the softmax runs in float64.
            logits = net(batch.to(device, torch.float32))
            probs = torch.softmax(torch.nan_to_num(logits.double(), nan=0.0), dim=1)
            out.append(probs.cpu().numpy().astype(np.float32, copy=False))
    if not out:
        return np.empty((0, 0), np.float32)
    return np.concatenate(out)


def metrics(y_true: npt.NDArray[np.int64], y_pred: npt.NDArray[np.int64],
            labels: list[str]) -> dict[str, Any]:
    """Accuracy, macro F1, per-class precision/recall/support and the confusion matrix
    (rows: true class, columns: predicted)."""
    c = len(labels)
    confusion = np.zeros((c, c), dtype=np.int64)
    np.add.at(confusion, (y_true, y_pred), 1)
    tp = np.diag(confusion).astype(np.float64)
    predicted = confusion.sum(axis=0).astype(np.float64)
    support = confusion.sum(axis=1).astype(np.float64)
    precision = np.divide(tp, predicted, out=np.zeros(c), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(c), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(c),
                   where=(precision + recall) > 0)
    present = support > 0
    total = int(confusion.sum())
    return {
        "accuracy": float(tp.sum() / total) if total else None,
        "macro_f1": float(f1[present].mean()) if present.any() else None,
        "per_class": {label: {"precision": float(precision[i]), "recall": float(recall[i]),
                              "support": int(support[i])} for i, label in enumerate(labels)},
        "confusion": {"labels": list(labels), "matrix": confusion.tolist()},
    }


def fit(kind: str, x: npt.NDArray[np.float32], y: npt.NDArray[np.int64], labels: list[str],
        options: TrainOptions, *, device: torch.device,
        on_epoch: Callable[[int, float], None] = lambda epoch, loss: None,
        stop: Callable[[], str | None] = lambda: None
        ) -> tuple[nn.Sequential, dict[str, Any]]:
    """Train on (x, y) with a stratified holdout; the network and its holdout metrics.

    Deterministic for a seed on one device: every random draw (split, initialisation,
    shuffling) comes from one torch.Generator seeded with ``options.seed``. Classes are
    weighted by inverse frequency. ``stop`` is asked between steps and returns why training
    must end (cancelled, out of time) or None; ``on_epoch`` hears each epoch's mean loss.
    """
    classes = len(labels)
    gen = torch.Generator().manual_seed(options.seed)
    train_rows, held_rows = split(y, classes, options.holdout, gen)
    net = build(kind, x.shape[1], classes, options.hidden)
    with torch.no_grad():  # seeded initialisation, not the global RNG
        for layer in net:
            if isinstance(layer, nn.Linear):
                bound = 1.0 / math.sqrt(layer.in_features)
                layer.weight.copy_(torch.rand(layer.weight.shape, generator=gen) * 2 * bound
                                   - bound)
                layer.bias.zero_()
    xt = torch.from_numpy(np.ascontiguousarray(x[train_rows], dtype=np.float32)).to(device)
    yt = torch.from_numpy(y[train_rows]).to(device)
    mean = xt.mean(dim=0)
    std = xt.std(dim=0, unbiased=False) if len(xt) > 1 else torch.ones_like(mean)
    standardize = net[0]
    assert isinstance(standardize, Standardize)
    standardize.mean.copy_(mean.cpu())
    standardize.scale.copy_(torch.where(std > 1e-8, 1.0 / std, torch.ones_like(std)).cpu())
    net = net.to(device)
    counts = torch.bincount(yt, minlength=classes).double()
    weights = torch.where(counts > 0, len(yt) / (classes * counts.clamp(min=1)),
                          torch.zeros_like(counts)).float()
    loss_fn = nn.CrossEntropyLoss(weight=weights.to(device))
    optimiser = torch.optim.Adam(net.parameters(), lr=options.lr,
                                 weight_decay=options.weight_decay)
    n = len(xt)
    for epoch in range(1, options.epochs + 1):
        net.train()
        order = torch.randperm(n, generator=gen).to(device)
        total, seen = 0.0, 0
        for start in range(0, n, options.batch_size):
            why = stop()
            if why is not None:
                raise TrainingStopped(why)
            rows = order[start:start + options.batch_size]
            optimiser.zero_grad(set_to_none=True)
            loss = loss_fn(net(xt[rows]), yt[rows])
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(rows)
            seen += len(rows)
        on_epoch(epoch, total / max(seen, 1))
    net.eval()
    evaluated = held_rows if len(held_rows) else train_rows
    probs = predict_proba(for_inference(net), x[evaluated], device)  # as predictions run
    result = metrics(y[evaluated], probs.argmax(axis=1).astype(np.int64), labels)
    result["evaluated_on"] = "holdout" if len(held_rows) else "train"
    result["counts"] = {"train": len(train_rows), "holdout": len(held_rows)}
    return net, result

