#!/usr/bin/env bash
# heal_pl's GPU check: heal fit (bf16-mixed and 16-mixed with routing; routing must see unscaled gradients),
# fast forks == recompute on CUDA, heal calibrate and heal survival on CUDA in bf16, FSDP on every GPU
# (heal_pl/configs/gpu/fsdp.yaml), the barrier cost / memory benchmarks, and a Llama-3-8B-shaped step (bf16 and nf4,
# checkpointing, batch 8 x 2048: benchmarks/scale_step.py), survival at Gemma-3-4B's shape (64 prompts x 512 tokens:
# benchmarks/survival_scale.py) and, with two GPUs, heal survival under torchrun; rows printed as they finish.
#   --only scale: the 8B steps alone (~4 min); --only survival: the 4B survival (~3 min); --only base: the others;
#   --budget SECONDS (default 540).
#
#   bash benchmarks/gpu_check.sh --prepare   # HERE (any machine with heal_pl's venv): copy the pure-Python packages
#                                            # a bare CUDA image may lack into .gpu_site/ (git-ignored)
#   bash benchmarks/gpu_check.sh             # THERE (the GPU machine, .gpu_site/ carried along): run the check
#   bash benchmarks/gpu_check.sh --dry-run   # its steps on the CPU, tiny sizes (no 16-mixed, no FSDP)
#   bash benchmarks/gpu_check.sh --only scale # the 8B steps only (needs bitsandbytes for nf4: .gpu_site/ has not it)
#
# Needs on the GPU machine: python3 with a CUDA torch, lightning, transformers, peft, tensorboard, pandas, scipy,
# matplotlib, tokenizers (most CUDA images with PyTorch have them); .gpu_site/ adds jsonargparse (+
# docstring_parser, typeshed_client), lifelines (+ autograd, autograd_gamma, formulaic, interface_meta, narwhals,
# wrapt). No network, no model download: the model is a random SmolLM2-shaped Llama built on the spot
# (benchmarks/gpu_check.py says what that means), and a random Llama-3-8B-shaped one for the 8B steps.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PACKAGES="jsonargparse docstring_parser typeshed_client lifelines autograd autograd_gamma formulaic interface_meta narwhals wrapt"

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
# the script keeps to --budget (default 540 s: each step's limit is cut to what is left) and prints every row as
# its step ends; this outer limit only catches a hang outside any step
exec timeout 600 $PY benchmarks/gpu_check.py "$@"
