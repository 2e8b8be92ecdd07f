"""Inception-v3 image featurizer: 2048-d pool features, L2-normalised, batched."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image
from torchvision.models import Inception3, Inception_V3_Weights, inception_v3
from torchvision.transforms.functional import pil_to_tensor

log = logging.getLogger("dotsearch.featurizer")

FEATURE_DIM = 2048
RANDOM_SEED = 20240229


@dataclass(frozen=True)
class Label:
    """One ImageNet class with its softmax probability."""

    label: str
    index: int
    probability: float


class _Subtract(torch.nn.Module):
    """Subtracts a fixed vector (the random model's mean pool feature) before normalising."""

    def __init__(self, center: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("center", center.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        center: torch.Tensor = self.center  # type: ignore[assignment]
        return x - center.to(x.dtype)


def _pink_noise(n: int, seed: int, size: int = 299) -> torch.Tensor:
    """Seeded 1/f ("natural image") noise, ImageNet-normalised scale: (n, 3, size, size)."""
    generator = torch.Generator().manual_seed(seed)
    white = torch.randn(n, 3, size, size, generator=generator)
    fy = torch.fft.fftfreq(size).reshape(-1, 1)
    fx = torch.fft.rfftfreq(size).reshape(1, -1)
    radius = torch.sqrt(fx * fx + fy * fy).clamp(min=1.0 / size)
    spectrum = torch.fft.rfft2(white) / radius
    pink = torch.fft.irfft2(spectrum, s=(size, size))
    pink = pink - pink.mean(dim=(1, 2, 3), keepdim=True)
    return pink / pink.std(dim=(1, 2, 3), keepdim=True)


def _random_model(seed: int) -> Inception3:
    """Seeded random Inception-v3 whose BatchNorm statistics are calibrated on noise.

    torchvision's init leaves the BN running statistics at mean 0 / var 1, so activations
    grow by orders of magnitude per block (pool features ~1e10, every image nearly
    parallel, and float16 would overflow). One calibration pass over seeded noise images
    in training mode sets the running statistics so each layer's output is normalised;
    the result is deterministic for a given seed and a usable random projection. Pool
    features after ReLU are all positive and share one dominant direction (cosine ~0.99
    between unrelated photographs), so the mean pool feature of the noise is subtracted.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = inception_v3(weights=None, aux_logits=False, init_weights=True)
        model.fc = torch.nn.Identity()
        noise = _pink_noise(8, seed + 1)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.reset_running_stats()
                module.momentum = None  # cumulative average over the calibration pass
        model.train()
        with torch.no_grad():
            model(noise)
            model.eval()
            center = model(noise).mean(dim=0)
    model.fc = _Subtract(center)
    return model


def _load_file(path: Path) -> tuple[Inception3, torch.nn.Module | None]:
    """Inception-v3 from a local state_dict (.pth); keeps its classifier if it has one."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state_dict, got {type(state).__name__}")
    state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}
    num_classes = int(state["fc.weight"].shape[0]) if "fc.weight" in state else 1000
    model = inception_v3(weights=None, aux_logits=False, init_weights=False,
                         num_classes=num_classes)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise ValueError(f"{path}: not an Inception-v3 state_dict "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    classifier = model.fc if "fc.weight" in state else None
    model.fc = torch.nn.Identity()
    return model.eval(), classifier


class Featurizer:
    """torchvision Inception-v3 as a feature extractor.

    ``weights``: ``imagenet`` (torchvision's download and cache), ``random`` (seeded,
    deterministic), a path to a state_dict, or ``auto`` (imagenet, else random with a
    warning). ``weights_name`` says which was loaded; ``pretrained`` whether the
    ImageNet classifier (and so top-5 labels) is available.
    """

    dim = FEATURE_DIM

    def __init__(self, weights: str = "auto", *, device: str | None = None,
                 batch_size: int = 32, seed: int = RANDOM_SEED) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.half = self.device.type == "cuda"
        self.batch_size = batch_size
        self.requested = weights
        self.warning: str | None = None
        self.categories: list[str] | None = None
        self.classifier: torch.nn.Module | None = None
        self.transform = Inception_V3_Weights.IMAGENET1K_V1.transforms()
        self.model = self._load(weights, seed)
        self.model.to(self.device)
        if self.classifier is not None:
            self.classifier.to(self.device).eval()
        if self.half:
            self.model.half()
        self._lock = threading.Lock()

    def _load(self, weights: str, seed: int) -> Inception3:
        if weights in ("imagenet", "auto"):
            try:
                spec = Inception_V3_Weights.IMAGENET1K_V1
                model = inception_v3(weights=spec, progress=False)  # transform_input=True
                self.classifier = model.fc
                model.fc = torch.nn.Identity()
                model.AuxLogits = None
                model.aux_logits = False
                self.categories = list(spec.meta["categories"])
                self.weights_name = "imagenet"
                return model.eval()
            except Exception as exc:
                if weights == "imagenet":
                    raise RuntimeError(f"could not load ImageNet Inception-v3 weights: {exc}") \
                        from exc
                self.warning = (f"pretrained Inception-v3 weights unavailable ({exc}); "
                                f"using SEEDED RANDOM weights: similarity is only "
                                f"near-duplicate quality and there are no ImageNet labels")
                log.warning("!!! %s", self.warning)
        if weights in ("random", "auto"):
            self.weights_name = "random"
            return _random_model(seed)
        path = Path(weights)
        if not path.is_file():
            raise ValueError(f"weights must be auto, imagenet, random or a file; "
                             f"{weights!r} is none of those")
        model, self.classifier = _load_file(path)
        if self.classifier is not None and getattr(self.classifier, "out_features", 0) == 1000:
            self.categories = list(Inception_V3_Weights.IMAGENET1K_V1.meta["categories"])
        self.weights_name = f"file:{path}"
        return model

    @property
    def pretrained(self) -> bool:
        """True when ImageNet labels can be given."""
        return self.categories is not None and self.classifier is not None

    def info(self) -> dict[str, Any]:
        """What /health reports about the model."""
        return {"weights": self.weights_name, "requested": self.requested,
                "pretrained": self.pretrained, "device": str(self.device),
                "precision": "float16" if self.half else "float32", "dim": self.dim,
                "warning": self.warning}

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """RGB PIL images -> (n, 3, 299, 299) float tensor on the model's device.

        torchvision's Inception transform (resize 342 antialiased, centre crop 299, ImageNet
        normalisation). On a GPU the pixels travel as uint8 and are resized there, so the
        CPU only decodes; on the CPU this is exactly ``transform(image)``.
        """
        tensors = []
        for img in images:
            pixels = pil_to_tensor(img.convert("RGB"))
            if self.device.type != "cpu":
                pixels = pixels.to(self.device, non_blocking=True).float().div_(255.0)
            tensors.append(self.transform(pixels))
        return torch.stack(tensors)

    def _run(self, images: Sequence[Image.Image], top: int
             ) -> tuple[npt.NDArray[np.float32], list[list[Label]]]:
        vectors = np.empty((len(images), self.dim), dtype=np.float32)
        labels: list[list[Label]] = []
        for start in range(0, len(images), self.batch_size):
            batch = self.preprocess(images[start:start + self.batch_size]).to(self.device)
            if self.half:
                batch = batch.half()
            with self._lock, torch.inference_mode():
                pooled = self.model(batch)
                if top and self.pretrained:
                    assert self.classifier is not None and self.categories is not None
                    probs = torch.softmax(self.classifier(pooled.float()), dim=1)
                    values, indices = probs.topk(top, dim=1)
                    for row_v, row_i in zip(values.tolist(), indices.tolist(), strict=True):
                        labels.append([Label(self.categories[i], i, round(v, 6))
                                       for v, i in zip(row_v, row_i, strict=True)])
            feats = pooled.float()
            feats = torch.nn.functional.normalize(feats, dim=1, eps=1e-12)
            vectors[start:start + len(batch)] = feats.cpu().numpy()
        if not np.isfinite(vectors).all():
            raise RuntimeError("featurizer produced non-finite features")
        return vectors, labels

    def featurize(self, images: Sequence[Image.Image]) -> npt.NDArray[np.float32]:
        """Images -> (n, 2048) float32, each row of unit length."""
        if not images:
            return np.empty((0, self.dim), dtype=np.float32)
        return self._run(images, top=0)[0]

    def featurize_with_labels(self, images: Sequence[Image.Image], top: int = 5
                              ) -> tuple[npt.NDArray[np.float32], list[list[Label]]]:
        """Features plus the ImageNet top-``top`` labels (empty lists without pretrained)."""
        vectors, labels = self._run(images, top=top)
        if not labels:
            labels = [[] for _ in images]
        return vectors, labels
