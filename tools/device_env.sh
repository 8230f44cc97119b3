#!/usr/bin/env bash
# Source on a machine where effcompile is not pip-installed (e.g. the lent GPU machine, whose image has
# torch/transformers/peft but no registry): makes `import effcompile` work from this checkout by linking
# rewrite/ and passes/ into a package folder on PYTHONPATH, without touching the checkout.
#   source tools/device_env.sh
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
pkg="$(mktemp -d)/effcompile"
mkdir -p "$pkg"
for entry in "$root"/rewrite/*; do ln -s "$entry" "$pkg/"; done
ln -s "$root/passes" "$pkg/passes"
export PYTHONPATH="$(dirname "$pkg")${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# Several GPUs: keep NVLink multicast off (it can take a shared host's GPUs out of service).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
