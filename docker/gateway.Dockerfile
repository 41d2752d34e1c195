# syntax=docker/dockerfile:1
# The gateway: the OpenAI-compatible HTTP API in front of the engines. No torch, no engine
# code: the gateway speaks to engines over gRPC only, so its image holds its own
# dependencies (docker/gateway-requirements.txt, pinned by docker/constraints.txt), the
# packages `gateway` and `moeserve` (the generated gRPC stubs, shared observability), and
# nothing else. Built from the repository root: docker build -f docker/gateway.Dockerfile .

FROM python:3.11.14-slim-bookworm AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
COPY docker/constraints.txt docker/gateway-requirements.txt /tmp/
RUN /opt/venv/bin/pip install -c /tmp/constraints.txt -r /tmp/gateway-requirements.txt
# Only the two packages the gateway imports; `engine` and `kernels` stay out of the image.
COPY gateway /opt/moeserve/gateway
COPY moeserve /opt/moeserve/moeserve
RUN /opt/venv/bin/python -m compileall -q /opt/moeserve

FROM python:3.11.14-slim-bookworm
RUN groupadd --system --gid 10001 moeserve \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/moeserve moeserve \
    && mkdir -p /data \
    && chown 10001:10001 /data
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/moeserve /opt/moeserve
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/opt/moeserve \
    PYTHONUNBUFFERED=1
# The usage store's SQLite file lives here; compose mounts a named volume over it.
VOLUME ["/data"]
WORKDIR /data
USER 10001:10001
EXPOSE 8000
# compose.yaml gives the full command; this default serves the engine named `engine`.
CMD ["python", "-m", "gateway", "serve", "--engine", "engine:50051", "--host", "0.0.0.0", "--port", "8000", \
     "--usage-db", "sqlite:////data/usage.db", "--key-secret-file", "/run/secrets/key_secret"]
