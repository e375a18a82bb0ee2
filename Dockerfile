# janus-train image: CUDA + the exact pins of constraints.txt (the lock), DeepSpeed's CPU-Adam and
# fused-Adam ops compiled at build time, a non-root user, `janus-job` as entrypoint.
# Build: docker build -t ghcr.io/janus-train/janus-train:0.1.0 .

ARG CUDA_DEVEL=nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04
ARG CUDA_RUNTIME=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

FROM ${CUDA_DEVEL} AS build
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential ninja-build git \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/janus && /opt/janus/bin/python -m pip install "pip==25.3"
ENV PATH=/opt/janus/bin:$PATH
WORKDIR /src
COPY constraints.txt pyproject.toml README.md ./
# torch first, CUDA build of the locked version (the lock's torch==X matches X+cu128)
RUN pip install -c constraints.txt --index-url https://download.pytorch.org/whl/cu128 \
      --extra-index-url https://pypi.org/simple "torch==2.13.0"
# DeepSpeed with the two optimizer ops prebuilt (no JIT compile on the GPU nodes)
ENV TORCH_CUDA_ARCH_LIST="8.0;9.0" DS_BUILD_OPS=0 DS_BUILD_CPU_ADAM=1 DS_BUILD_FUSED_ADAM=1
RUN pip install -c constraints.txt --no-build-isolation "deepspeed==0.19.8"
COPY janus_job ./janus_job
RUN pip install -c constraints.txt . \
 && pip check \
 && python -c "from deepspeed.git_version_info import installed_ops as o; assert o['cpu_adam'] and o['fused_adam'], o"
# NCCL is the one the torch wheel pins exactly (the nvidia-nccl-cu12 wheel, loaded by torch from the
# venv), not the base image's libnccl2; its version is recorded in the image for the network check's
# bench records and for support questions.
RUN python -c "import importlib.metadata as m; print(m.version('nvidia-nccl-cu12'))" > /opt/janus/NCCL_VERSION \
 && echo "NCCL $(cat /opt/janus/NCCL_VERSION) (nvidia-nccl-cu12, pinned by torch)"

FROM ${CUDA_RUNTIME}
ENV DEBIAN_FRONTEND=noninteractive
# RDMA userspace for NCCL's IB/RoCE transport (Ubuntu 24.04 names): libibverbs1 is the verbs library
# NCCL dlopens, ibverbs-providers the HCA drivers it loads (libmlx5, ...), rdma-core their udev and
# config files, ibverbs-utils ibv_devinfo for looking at a pod by hand. Without them NCCL uses sockets.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 libgomp1 ca-certificates \
      rdma-core libibverbs1 ibverbs-providers ibverbs-utils \
 && rm -rf /var/lib/apt/lists/* \
 && (userdel --remove ubuntu 2>/dev/null || true) \
 && groupadd --gid 1000 janus && useradd --uid 1000 --gid 1000 --create-home --shell /usr/sbin/nologin janus
COPY --from=build /opt/janus /opt/janus
ENV PATH=/opt/janus/bin:$PATH HF_HOME=/home/janus/.cache/huggingface PYTHONUNBUFFERED=1
# the same load the start-of-job check does (janus_job/deploy/network.py): the build fails without verbs
RUN python -c "from janus_job.deploy.network import load_verbs, verbs_device_names; verbs_device_names(load_verbs())"
USER 1000:1000
WORKDIR /home/janus
ENTRYPOINT ["janus-job"]
CMD ["--help"]
