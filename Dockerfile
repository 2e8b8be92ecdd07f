# dotsearch on a GPU box: docker build -t dotsearch . && docker run --gpus all -p 8000:8000 -v dotsearch-data:/data dotsearch
# CUDA 13 runtime to match the `gpu` extra (cupy-cuda13x); torch brings its own CUDA libraries.
FROM nvidia/cuda:13.0.1-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH TORCH_HOME=/opt/torch
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv $VIRTUAL_ENV

WORKDIR /app
COPY pyproject.toml README.md ./
COPY service ./service
COPY gpu ./gpu
COPY cpu_fallback ./cpu_fallback
COPY bench ./bench
RUN pip install ".[gpu,cluster]"

# Bake torchvision's pretrained Inception-v3 into the image so the server needs no network
# at start (build with --build-arg PREFETCH_WEIGHTS=0 to skip; `auto` then falls back).
ARG PREFETCH_WEIGHTS=1
RUN if [ "$PREFETCH_WEIGHTS" = "1" ]; then python -c "from torchvision.models import \
Inception_V3_Weights as W; W.IMAGENET1K_V1.get_state_dict(progress=False)"; fi

RUN useradd --create-home --uid 10001 dotsearch && mkdir -p /data /opt/torch \
 && chown dotsearch /data && chmod -R a+rX /opt/torch
USER dotsearch

ENV DOTSEARCH_HOST=0.0.0.0 DOTSEARCH_PORT=8000 DOTSEARCH_DATA_DIR=/data \
    DOTSEARCH_BACKEND=auto DOTSEARCH_WEIGHTS=auto
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)" || exit 1
# Exec form: SIGTERM reaches uvicorn, which drains requests and closes the storage.
CMD ["dotsearch", "serve", "--host", "0.0.0.0"]
