# simsearch as an HTTP service (`simsearch serve`) on the CPU.
#
# Build:   docker build -t simsearch .
# Index:   docker run --rm -v simsearch-store:/data/store -v "$PWD/photos:/images:ro" \
#              simsearch simsearch index /images --store /data/store
# Serve:   docker run -p 127.0.0.1:8000:8000 -v simsearch-store:/data/store \
#              -v "$PWD/photos:/images:ro" simsearch
#
# The photos are mounted at the same path for `index` and `serve`, so the store's paths (and
# `file://` queries) stay valid. Not built in this project's CI (no docker there): keep it simple.
FROM python:3.11-slim

# PyTorch's CPU-only wheels: the default PyPI wheels bring the CUDA libraries (gigabytes).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SIMSEARCH_STORE=/data/store

WORKDIR /opt/simsearch

RUN pip install --index-url "${TORCH_INDEX_URL}" torch torchvision

COPY pyproject.toml README.md alembic.ini ./
COPY migrations ./migrations
COPY simsearch ./simsearch
RUN pip install ".[serve]"

RUN useradd --create-home --uid 10001 simsearch \
    && mkdir -p /data/store \
    && chown simsearch:simsearch /data/store
USER simsearch
VOLUME /data/store
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status != 200)"]

CMD ["simsearch", "serve", "--host", "0.0.0.0", "--port", "8000", "--store", "/data/store"]
