"""POST /v1/featurize: an image -> its 2048-d vector (+ ImageNet top-5 with pretrained weights)."""

from __future__ import annotations

import time

from fastapi import APIRouter

from service.routes.deps import READ, ServicesDep
from service.routes.images import ImageFile, featurize_uploads
from service.schemas import ERROR_RESPONSES, FeaturizeOut, Label

router = APIRouter(prefix="/v1", tags=["images"], responses=ERROR_RESPONSES)


@router.post("/featurize", dependencies=READ)
async def featurize(file: ImageFile, services: ServicesDep) -> FeaturizeOut:
    start = time.perf_counter()
    featurizer = services.need_featurizer()
    vectors, labels, _ = await featurize_uploads(services, [file], with_labels=True)
    return FeaturizeOut(
        vector=vectors[0].tolist(), dim=int(vectors.shape[1]), weights=featurizer.weights_name,
        labels=[Label(label=x.label, index=x.index, probability=x.probability)
                for x in labels[0]] if featurizer.pretrained else None,
        took_ms=round((time.perf_counter() - start) * 1000, 3))
