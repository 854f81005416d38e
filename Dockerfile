# srnode: the node (`serve`) and the GPU worker (`worker`) in one CUDA-capable image.
#
#   docker build -t srnode .
#   docker run --gpus all -v ./config.toml:/etc/srnode/config.toml:ro -v srnode-spool:/var/lib/srnode/spool \
#              -p 11112:11112 -p 8480:8480 srnode                        # the node
#   docker run --gpus all ... srnode worker --config /etc/srnode/config.toml   # a worker, one per GPU
#
# torch comes from its default Linux wheel, the CUDA build (CUDA runtime libraries as pip packages), so the
# base image needs no CUDA toolkit: the NVIDIA container runtime provides the driver. The build runs the same
# two scripts as `make install` in CI (scripts/install-system.sh, scripts/install-python.sh).
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/srnode/venv \
    PATH=/opt/srnode/venv/bin:$PATH \
    HF_HUB_OFFLINE=1 \
    SRNODE_HEALTH_URL=http://127.0.0.1:8480/healthz

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /opt/srnode/src

# dcmtk (storescu/echoscu for operators), from the script CI uses; apt lists removed in the same layer
COPY scripts/install-system.sh scripts/install-system.sh
RUN bash scripts/install-system.sh --runtime \
    && rm -rf /var/lib/apt/lists/*

# torch (CUDA wheel) first: the largest layer, rebuilt only when the pin in the script changes
COPY scripts/install-python.sh scripts/install-python.sh
COPY pyproject.toml README.md ./
COPY node node
COPY models models
RUN python -m venv "$VIRTUAL_ENV" \
    && PY="$VIRTUAL_ENV/bin/python" bash scripts/install-python.sh \
    && python -c "import node.app.cli, models.engine"

# non-root user; the spool is a volume, the config a read-only mount
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/srnode --shell /usr/sbin/nologin srnode \
    && mkdir -p /var/lib/srnode/spool /etc/srnode \
    && chown -R srnode:srnode /var/lib/srnode
COPY --chown=root:root deploy/config.toml /etc/srnode/config.toml
USER 10001:10001
WORKDIR /var/lib/srnode
VOLUME ["/var/lib/srnode/spool"]
EXPOSE 11112 8480

HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['SRNODE_HEALTH_URL'], timeout=8)"]

ENTRYPOINT ["srnode"]
CMD ["serve", "--config", "/etc/srnode/config.toml"]
