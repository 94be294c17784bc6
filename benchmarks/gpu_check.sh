#!/usr/bin/env bash
# heal_pl's GPU check: heal fit (bf16-mixed and 16-mixed with routing; routing must see unscaled gradients),
# fast forks == recompute on CUDA, heal calibrate and heal survival on CUDA in bf16, FSDP on one GPU
# (heal_pl/configs/gpu/fsdp.yaml), the barrier cost / memory benchmarks; one table at the end. Under 8 minutes on one H200.
#
#   bash benchmarks/gpu_check.sh --prepare   # HERE (any machine with heal_pl's venv): copy the pure-Python packages
#                                            # a bare CUDA image may lack into .gpu_site/ (git-ignored)
#   bash benchmarks/gpu_check.sh             # THERE (the GPU machine, .gpu_site/ carried along): run the check
#   bash benchmarks/gpu_check.sh --dry-run   # its steps on the CPU, tiny sizes (no 16-mixed, no FSDP)
#
# Needs on the GPU machine: python3 with a CUDA torch, lightning, transformers, peft, tensorboard, pandas, scipy,
# matplotlib, tokenizers (most CUDA images with PyTorch have them); .gpu_site/ adds jsonargparse (+
# docstring_parser, typeshed_client), lifelines (+ autograd, autograd_gamma). No network, no model download: the
# model is a random SmolLM2-shaped Llama built on the spot (benchmarks/gpu_check.py says what that means).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PACKAGES="jsonargparse docstring_parser typeshed_client lifelines autograd autograd_gamma"

if [[ "${1:-}" == "--prepare" ]]; then
  site=$($PY -c "import jsonargparse, pathlib; print(pathlib.Path(jsonargparse.__file__).parents[1])")
  rm -rf .gpu_site && mkdir -p .gpu_site
  for p in $PACKAGES; do
    cp -r "$site/$p" .gpu_site/
    cp -r "$site"/"$p"-*.dist-info .gpu_site/ 2>/dev/null || cp -r "$site"/"${p//_/-}"-*.dist-info .gpu_site/
  done
  exclude=$(git rev-parse --git-path info/exclude)
  grep -qx '/.gpu_site/' "$exclude" 2>/dev/null || echo '/.gpu_site/' >> "$exclude"
  echo "gpu_check: .gpu_site/ ready ($(du -sh .gpu_site | cut -f1)); carry it to the GPU machine"
  exit 0
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[[ -d .gpu_site ]] && export PYTHONPATH="$PYTHONPATH:$PWD/.gpu_site"   # after the image's own packages
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export HEAL_PL_CACHE=${HEAL_PL_CACHE:-/tmp/heal_pl_cache}

if [[ "${1:-}" != "--dry-run" ]]; then
  if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: FAILED: torch sees no CUDA device ($($PY -c 'import torch; print(torch.__version__)' 2>&1))." >&2
    echo "gpu_check: this check needs a CUDA GPU; 'bash benchmarks/gpu_check.sh --dry-run' runs its steps on the CPU." >&2
    exit 2
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
exec timeout 470 $PY benchmarks/gpu_check.py "$@"
