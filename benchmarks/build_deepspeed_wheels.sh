#!/usr/bin/env bash
# The wheels the `deepspeed` step of whole_model_h200.sh installs on the device (which has no network):
# DeepSpeed itself, built here from its sdist with its compiled ops off (ZeRO-3 parameter offload needs none;
# pure python), and the dependencies the device's image lacks, as CPython 3.12 manylinux x86_64 wheels.
# torch, numpy and transformers are the device's own. Versions pinned to the set that was checked offline
# (an install from the folder with --no-index; DeepSpeed's --tiny run on its CPU accelerator).
#   bash benchmarks/build_deepspeed_wheels.sh [.whl/deepspeed]     # then carry the folder (6.9 MB)
set -euo pipefail
dest=${1:-.whl/deepspeed}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
DS_BUILD_OPS=0 pip wheel -q --no-deps --no-build-isolation deepspeed==0.19.8 -w "$tmp"
pip download -q --only-binary=:all: --python-version 3.12 --implementation cp --no-deps \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --platform manylinux2010_x86_64 --platform manylinux_2_12_x86_64 -d "$tmp" \
    hjson==3.1.0 py-cpuinfo==9.0.0 msgpack==1.2.4 ninja==1.13.2 einops==0.8.2 pydantic==2.14.4 \
    pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 \
    nvidia-ml-py==13.615.71 psutil==7.2.2 packaging==26.4 tqdm==4.70.1 setuptools==84.2.1
mkdir -p "$dest"
mv "$tmp"/*.whl "$dest"/                  # only once every wheel is in hand
ls "$dest"
