# One image for the API and the GPU worker (the command differs). CUDA runtime base; torch brings its own
# CUDA libraries from the index, so the base only has to provide the driver interface.
FROM nvidia/cuda:13.0.1-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SLIM_DATA_DIR=/data
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev make curl ca-certificates \
 && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 slim && mkdir -p /app /data && chown slim:slim /app /data
WORKDIR /app
USER slim

# Dependencies first (cached layer), then the code. Same pins as pyproject.toml; find-links off (FINDINGS).
COPY --chown=slim:slim pyproject.toml Makefile README.md ./
COPY --chown=slim:slim slimcore ./slimcore
COPY --chown=slim:slim api ./api
COPY --chown=slim:slim worker ./worker
RUN python3 -m venv .venv \
 && PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= .venv/bin/pip install --no-cache-dir . \
 && .venv/bin/python -c "import torch, torchvision, api.app, worker.tasks"
ENV PATH=/app/.venv/bin:$PATH

EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s CMD curl -fsS http://127.0.0.1:8000/healthz || exit 1
# API by default; the worker service overrides the command with `slim worker`.
CMD ["slim", "serve", "--host", "0.0.0.0", "--port", "8000", "--no-worker"]
