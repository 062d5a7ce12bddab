# The tunelab app (Gradio: Chat, Travel Planner, feedback) on CPU. The model is mounted, not baked in:
#   docker build -t tunelab-app .
#   docker run --rm -p 7860:7860 -v "$PWD/runs/my-run/export:/models:ro" -v tunelab-data:/data \
#     -e TUNELAB_AUTH=admin:change-me tunelab-app
# See docs/deploy.md (remote model with --backend-url, the OpenAI-compatible API with --api).
FROM python:3.11-slim

# A C/C++ toolchain: llama-cpp-python builds llama.cpp from source.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake git \
 && rm -rf /var/lib/apt/lists/*

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    GRADIO_ANALYTICS_ENABLED=False \
    HF_HUB_DISABLE_TELEMETRY=1
WORKDIR /app

# torch from the CPU index (PyPI's Linux wheel pulls the CUDA libraries: gigabytes an app never uses).
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"
# llama.cpp for any x86-64 host: no -march=native, and no AMX kernels (they crash on VMs that advertise AMX).
RUN CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_BF16=OFF" \
    pip install "llama-cpp-python[server]==0.3.36"

COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install .

RUN useradd --create-home --uid 1000 app && mkdir -p /data /models && chown app /data
USER app
VOLUME ["/data"]
EXPOSE 7860
ENTRYPOINT ["tunelab"]
CMD ["serve", "/models/model-q4_k_m.gguf", "--host", "0.0.0.0", "--port", "7860", "--feedback-db", "/data/feedback.db"]
