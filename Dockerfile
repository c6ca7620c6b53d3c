# syntax=docker/dockerfile:1
# The operator image: `pbt operator` (kopf) with the `operator` extra only (no torch, no training code).
#   docker build -t ghcr.io/pbt-operator/pbt-operator:0.1.0 .
# Base images are pinned by version; pin them by digest too (FROM image:tag@sha256:...) for reproducible builds.
# BASE_IMAGE: the tests build a stand-in of the same Debian release under this name (hack/realnode.sh).
ARG BASE_IMAGE=python:3.11.14-slim-bookworm

FROM ${BASE_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
COPY worker ./worker
# A virtual environment at the path it keeps in the final stage; a regular (non-editable) install.
RUN python -m venv /opt/pbt \
 && /opt/pbt/bin/pip install --upgrade pip \
 && /opt/pbt/bin/pip install ".[operator]" \
 && /opt/pbt/bin/python -m compileall -q /opt/pbt/lib \
 && /opt/pbt/bin/pbt --help >/dev/null

FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="pbt-operator" \
      org.opencontainers.image.description="Population Based Training (PBT/PB2) as a Kubernetes operator" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/pbt/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    OPENBLAS_NUM_THREADS=1 \
    HOME=/tmp
COPY --from=build /opt/pbt /opt/pbt
# Numeric uid/gid so that runAsNonRoot can be verified by the kubelet.
USER 65532:65532
# 8080: /healthz (liveness and readiness), 8000: Prometheus /metrics
EXPOSE 8080 8000
ENTRYPOINT ["pbt", "operator"]
