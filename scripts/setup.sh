#!/usr/bin/env bash
# Create .venv and install mftcoder with the exact tested versions (constraints.txt; pyproject.toml holds only
# ranges). torch==2.13.0 goes in first: an unpinned torch (pulled through peft/accelerate) would be a
# multi-GB CUDA build. The qlora extra (bitsandbytes, CPU-capable) is in so that the QLoRA tests run; plot (matplotlib) draws curves.png.
#   bash scripts/setup.sh           the default environment
#   bash scripts/setup.sh atorch    the same .venv plus ATorch (distributed_strategy: atorch): it installs next to
#                                   mftcoder's pins without changing any of them, so no second environment is needed
#   bash scripts/setup.sh image     .venv-image: the GPU machine's packages (scripts/gpu_image.txt: torch 2.11,
#                                   transformers 5.17), without mftcoder, for the CPU rehearsal of scripts/gpu_check.py
set -euo pipefail
cd "$(dirname "$0")/.."
extras="test,qlora,plot,eval"
case "${1:-}" in
  "") ;;
  atorch) extras="$extras,atorch" ;;
  image)
    python3 -m venv .venv-image
    .venv-image/bin/pip install --quiet --disable-pip-version-check -r scripts/gpu_image.txt
    exit 0 ;;
  *) echo "usage: $0 [atorch|image]" >&2; exit 2 ;;
esac
python3 -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check -c constraints.txt "torch==2.13.0"
.venv/bin/pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[$extras]"
