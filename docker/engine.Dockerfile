# syntax=docker/dockerfile:1
# The engine on NVIDIA GPUs: torch's CUDA build and the `gpu` extra (FlashInfer, Triton).
# The model is not in the image: compose.yaml mounts a checkpoint directory read-only at
# /models/model. Built from the repository root: docker build -f docker/engine.Dockerfile .
#
# The runtime stage is CUDA's -devel image, not -runtime, on purpose: FlashInfer compiles
# with nvcc, on first use, any kernel that its precompiled set lacks, and Triton compiles a
# small C launcher with gcc against Python's headers. Neither downloads: flashinfer-cubin
# carries the precompiled kernels FlashInfer would otherwise fetch, at the version of
# flashinfer-python that the gpu extra and docker/constraints.txt pin.
# The CUDA version of the base image and of torch's wheel index must agree (nvcc builds
# extensions against torch's headers); change both build arguments together.

FROM nvidia/cuda:12.8.1-devel-ubuntu24.04 AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
# Ubuntu's packages come at the revisions of the pinned base image's release (pinning
# Debian revisions breaks the build whenever the archive moves on).
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3.12 python3.12-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3.12 -m venv /opt/venv
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
COPY docker/constraints.txt /tmp/constraints.txt
# torch's CUDA build with its CUDA libraries (nvidia-* wheels, triton) from PyTorch's index
# for the base image's CUDA version.
RUN /opt/venv/bin/pip install --index-url "$TORCH_INDEX_URL" torch==2.13.0
COPY pyproject.toml README.md /src/
COPY engine /src/engine
COPY kernels /src/kernels
COPY gateway /src/gateway
COPY moeserve /src/moeserve
RUN /opt/venv/bin/pip install -c /tmp/constraints.txt "/src[gpu]"

FROM nvidia/cuda:12.8.1-devel-ubuntu24.04
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3.12 python3.12-dev gcc g++ \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 moeserve \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/moeserve moeserve \
    && mkdir -p /models/model
COPY --from=builder /opt/venv /opt/venv
COPY docker/grpc_health_probe.py /opt/moeserve/grpc_health_probe.py
# compose.yaml's entrypoint: TP, DP and EP as `engine serve` flags, checked against the GPUs reserved.
COPY docker/engine-entrypoint.sh /opt/moeserve/engine-entrypoint.sh
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1
WORKDIR /home/moeserve
USER 10001:10001
# gRPC, and Prometheus /metrics (--metrics-port).
EXPOSE 50051 9464
CMD ["python", "-m", "engine", "serve", "--model", "/models/model", "--host", "0.0.0.0", "--port", "50051", \
     "--device", "cuda"]
