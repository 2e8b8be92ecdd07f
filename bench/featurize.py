"""Featurize suite: Inception-v3 images per second by batch size, on the CPU and on the GPU."""

from __future__ import annotations

import time
from functools import partial
from typing import Any

from bench.harness import Report, SuiteSkipped, measure

SUITE = "featurize"
SAMPLES = ("astronaut", "coffee", "chelsea", "rocket", "cat", "camera", "immunohistochemistry",
           "retina", "hubble_deep_field", "motorcycle_left", "page", "horse")


def sample_images(count: int) -> list[Any]:
    """``count`` real photographs from scikit-image's bundled samples, cropped and flipped
    differently each time round so that no two inputs of a batch are the same image."""
    from PIL import Image, ImageOps
    from skimage import data

    base: list[Any] = []
    for name in SAMPLES:
        try:
            pixels = getattr(data, name)()
        except Exception:  # some samples need a download: skip them
            continue
        image = Image.fromarray(pixels)
        base.append(image.convert("RGB"))
    if not base:
        raise SuiteSkipped("no scikit-image sample photograph could be loaded")
    images = []
    for i in range(count):
        image = base[i % len(base)]
        cut = (i // len(base)) % 16
        width, height = image.size
        crop = image.crop((cut, cut, width - cut, height - cut))
        images.append(ImageOps.mirror(crop) if (i // len(base)) % 2 else crop)
    return images


def _model_input(featurizer: Any, images: list[Any]) -> Any:
    batch = featurizer.preprocess(images).to(featurizer.device)
    return batch.half() if featurizer.half else batch


def _forward(featurizer: Any, batch: Any) -> Any:
    import torch

    with torch.inference_mode():
        return featurizer.model(batch)


def run_featurize(report: Report, quick: bool = False,
                  batch_sizes: tuple[int, ...] | None = None,
                  min_repeats: int | None = None) -> dict[str, float]:
    """Images/s end to end (PIL image in, unit 2048-d vector out) for each batch size."""
    try:
        import torch

        from service.featurizer import Featurizer
    except ImportError as exc:
        raise SuiteSkipped(f"service.featurizer is not importable ({exc})") from exc
    min_repeats = min_repeats or (2 if quick else 3)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    results: dict[str, float] = {}
    series: dict[str, list[tuple[float, float]]] = {}
    for device in devices:
        sizes = batch_sizes or ((1, 2) if quick else (1, 8, 32) if device == "cpu"
                                else (1, 32, 256) if quick else (1, 8, 32, 128, 256, 512))
        started = time.perf_counter()
        featurizer = Featurizer("random", device=device, batch_size=max(sizes))
        load_s = time.perf_counter() - started
        info = featurizer.info()
        report.note(SUITE, f"{device}: weights {info['weights']} ({info['precision']}), "
                           f"model load {load_s:.1f} s; random weights cost the same as trained")
        for size in sizes:
            batches = [sample_images(size * 2)[:size], sample_images(size * 2)[size:]]
            featurizer.batch_size = size
            sync = torch.cuda.synchronize if device == "cuda" else None
            # The calibration call that measure() makes first is the warm-up.
            timing = measure(featurizer.featurize, batches, warmup=0, repeats=3, sync=sync,
                             budget_s=3.0 if quick else 15.0, min_repeats=min_repeats)
            preprocess = measure(featurizer.preprocess, batches, warmup=0, repeats=3,
                                 budget_s=1.0, min_repeats=min_repeats)
            tensors = [_model_input(featurizer, batch) for batch in batches]
            model = measure(partial(_forward, featurizer), tensors, warmup=0, repeats=3,
                            sync=sync, budget_s=2.0 if quick else 10.0, min_repeats=min_repeats)
            rate = size / timing.median_s
            results[f"{device} batch {size}"] = rate
            results[f"{device} model batch {size}"] = size / model.median_s
            series.setdefault(f"{device} end to end ({info['precision']})", []).append(
                (size, rate))
            series.setdefault(f"{device} model only ({info['precision']})", []).append(
                (size, size / model.median_s))
            report.add_row(SUITE, device=device, batch=size, images_per_s=rate,
                           model_only_images_per_s=size / model.median_s,
                           ms_per_batch=timing.median_s * 1e3,
                           preprocess_share=preprocess.median_s / timing.median_s,
                           precision=info["precision"])
        if device == "cuda":
            for kind in ("", "model "):
                best = max(v for k, v in results.items()
                           if k.startswith(f"cuda {kind}batch"))
                what = "model only" if kind else "end to end (PIL preprocessing included)"
                report.add_ratio(SUITE, f"GPU images/s, best batch size, {what}", best, 2000.0)
    report.add_plot("featurize", "Inception-v3 featurizer throughput", "batch size",
                    "images per second", series)
    return results
