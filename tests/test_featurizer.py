"""The Inception-v3 featurizer with seeded random weights: shape, norm, determinism, ranking."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from service.featurizer import Featurizer, _load_file, _random_model


def test_features_are_unit_length_2048(featurizer, photos):
    imgs = [photos["astronaut"], photos["coffee"]]
    vectors = featurizer.featurize(imgs)
    assert vectors.shape == (2, 2048) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.isfinite(vectors).all()
    assert featurizer.featurize([]).shape == (0, 2048)


def test_batching_does_not_change_results(featurizer, photos):
    imgs = list(photos.values())[:3]
    together = featurizer.featurize(imgs)
    alone = np.concatenate([featurizer.featurize([img]) for img in imgs])
    np.testing.assert_allclose(together, alone, atol=1e-4)


@pytest.mark.slow
def test_random_weights_are_seeded(featurizer):
    from service.featurizer import RANDOM_SEED

    a = featurizer.model.state_dict()
    b = _random_model(RANDOM_SEED).state_dict()
    assert all(torch.equal(a[key], b[key]) for key in a)  # weights, BN stats and centre
    torch.manual_seed(1)
    from torchvision.models import inception_v3

    other = inception_v3(weights=None, aux_logits=False, init_weights=True).state_dict()
    assert not torch.equal(a["Conv2d_1a_3x3.conv.weight"], other["Conv2d_1a_3x3.conv.weight"])


def test_random_features_separate_unrelated_photos(featurizer, photos):
    vectors = featurizer.featurize(list(photos.values()))
    sims = vectors @ vectors.T
    off = sims[~np.eye(len(sims), dtype=bool)]
    # Without BN calibration and centring every pair scores ~0.99 (see _random_model).
    assert off.mean() < 0.95


def test_flipped_and_cropped_copies_rank_their_original_in_top_3(featurizer, photos):
    originals = list(photos.values())
    base = featurizer.featurize(originals)
    flipped = featurizer.featurize([ImageOps.mirror(img) for img in originals])
    cropped = featurizer.featurize([
        img.crop((img.width // 20, img.height // 20, img.width - img.width // 20,
                  img.height - img.height // 20)) for img in originals])
    for queries in (flipped, cropped):
        scores = queries @ base.T
        for i in range(len(originals)):
            rank = int((scores[i] > scores[i, i]).sum())
            assert rank < 3, f"{list(photos)[i]} ranked {rank}"


def test_no_labels_without_pretrained_weights(featurizer, photos):
    assert not featurizer.pretrained
    vectors, labels = featurizer.featurize_with_labels([photos["coffee"]])
    assert vectors.shape == (1, 2048) and labels == [[]]
    info = featurizer.info()
    assert info["weights"] == "random" and info["dim"] == 2048


def test_weights_from_a_file_keep_the_classifier(tmp_path, photos):
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    model = inception_v3(weights=None, aux_logits=True, init_weights=False)
    path = tmp_path / "inception.pth"
    torch.save(model.state_dict(), path)
    _, classifier = _load_file(path)
    assert classifier is not None and classifier.out_features == 1000
    f = Featurizer(str(path), device="cpu")
    assert f.pretrained and f.weights_name == f"file:{path}"
    vectors, labels = f.featurize_with_labels([photos["chelsea"]])
    assert vectors.shape == (1, 2048) and len(labels[0]) == 5
    assert labels[0][0].probability >= labels[0][4].probability
    assert isinstance(labels[0][0].label, str)


def test_bad_weights_are_refused(tmp_path):
    with pytest.raises(ValueError, match="auto, imagenet, random"):
        Featurizer(str(tmp_path / "missing.pth"), device="cpu")
    bogus = tmp_path / "bogus.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bogus)
    with pytest.raises(ValueError, match="not an Inception-v3"):
        Featurizer(str(bogus), device="cpu")


@pytest.mark.slow
def test_auto_falls_back_to_random_loudly(monkeypatch, caplog):
    from torchvision.models import Inception_V3_Weights

    def no_network(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(type(Inception_V3_Weights.IMAGENET1K_V1), "get_state_dict", no_network)
    with caplog.at_level("WARNING"):
        f = Featurizer("auto", device="cpu")
    assert f.weights_name == "random" and f.warning and "RANDOM" in f.warning
    assert "RANDOM" in caplog.text
    with pytest.raises(RuntimeError, match="ImageNet"):
        Featurizer("imagenet", device="cpu")


def test_grayscale_and_tiny_images(featurizer):
    tiny = Image.new("L", (5, 3), 128)
    assert featurizer.featurize([tiny]).shape == (1, 2048)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device")
def test_gpu_half_precision_agrees_with_cpu(featurizer, photos):
    gpu = Featurizer("random", device="cuda", batch_size=4)
    assert gpu.half and gpu.info()["precision"] == "float16"
    imgs = list(photos.values())[:4]
    on_gpu, on_cpu = gpu.featurize(imgs), featurizer.featurize(imgs)
    assert np.isfinite(on_gpu).all()
    assert (np.sum(on_gpu * on_cpu, axis=1) > 0.99).all()
