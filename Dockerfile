# The dist_cnn image the Kubernetes manifests (k8s/) run: the package and train.py in /app, torch from
# the index that matches the base image.
#
#   CPU:  docker build -t dist-cnn:latest .
#   CUDA: docker build -t dist-cnn:cuda \
#           --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 \
#           --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 .
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Optional extras of the package, e.g. "ray" or "tensorboard,timm".
ARG EXTRAS=""

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

# CUDA base images come without Python; the python images have it.
RUN if ! command -v python3 >/dev/null 2>&1; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv

WORKDIR /app
# torch first, from its own index (CPU or the CUDA build); the package's other dependencies from PyPI.
RUN pip install --index-url "${TORCH_INDEX_URL}" torch torchvision
COPY pyproject.toml README.md ./
COPY dist_cnn ./dist_cnn
RUN pip install ".${EXTRAS:+[$EXTRAS]}"
COPY train.py ./

# Kubernetes manifests give the command (torchrun ... /app/train.py ...); alone, the image explains itself.
CMD ["python", "/app/train.py", "--help"]
