"""Shared pytest fixtures (append new fixtures at the end; keep each one small and generic)."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from PIL import Image

# Real photographs bundled with scikit-image (no download needed).
PHOTO_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "page")


@pytest.fixture(scope="session")
def photos() -> dict[str, Image.Image]:
    """A few of scikit-image's sample photographs as RGB PIL images."""
    import skimage.data

    out = {}
    for name in PHOTO_NAMES:
        out[name] = Image.fromarray(np.asarray(getattr(skimage.data, name)())).convert("RGB")
    return out


@pytest.fixture(scope="session")
def encode() -> Callable[..., bytes]:
    """encode(image, format="JPEG", **save_options) -> the encoded bytes."""

    def _encode(img: Image.Image, fmt: str = "JPEG", **options: object) -> bytes:
        buf = io.BytesIO()
        img.save(buf, format=fmt, **options)
        return buf.getvalue()

    return _encode


@pytest.fixture(scope="session")
def featurizer():
    """One seeded-random Inception-v3 on the CPU for the whole test session."""
    from service.featurizer import Featurizer

    return Featurizer("random", device="cpu", batch_size=8)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """A local Ray (2 CPUs), started once for the tests that ask for it and shut down at the
    end of the session, so no Ray process outlives the run; skipped without ray."""
    pytest.importorskip("ray", reason="the ray backend's tests need the `cluster` extra")
    from service.cluster import ensure_ray, shutdown_ray

    ensure_ray(num_cpus=2)
    yield
    shutdown_ray()
