# GPU image for torchx's kubernetes / slurm / local_docker schedulers (not built in CI).
# The torch / fbgemm / torchrec trio moves together: change all three or none.
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu22.04
FROM ${CUDA_IMAGE}
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu126
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1
RUN apt-get update && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3-pip \
    && rm -rf /var/lib/apt/lists/* && python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install torch==2.13.0 --index-url ${TORCH_INDEX} \
    && pip install fbgemm-gpu==1.8.0 --index-url ${TORCH_INDEX} \
    && pip install --no-deps torchrec==1.8.0
WORKDIR /workspace/cctl-rec
COPY requirements/gpu.txt requirements/gpu.txt
RUN pip install -r requirements/gpu.txt
COPY . .
RUN pip install --no-deps -e . && cctl-rec doctor
