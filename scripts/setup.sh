#!/usr/bin/env bash
# Create .venv and install mftcoder with the exact tested versions (constraints.txt; pyproject.toml holds only
# ranges). torch==2.13.0 goes in first: an unpinned torch (pulled through peft/accelerate) would be a
# multi-GB CUDA build. The qlora extra (bitsandbytes, CPU-capable) is in so that the QLoRA tests run; plot (matplotlib) draws curves.png.
#   bash scripts/setup.sh           the default environment
#   bash scripts/setup.sh atorch    the same .venv plus ATorch (distributed_strategy: atorch): it installs next to
#                                   mftcoder's pins without changing any of them, so no second environment is needed
set -euo pipefail
cd "$(dirname "$0")/.."
extras="test,qlora,plot,eval"
case "${1:-}" in
  "") ;;
  atorch) extras="$extras,atorch" ;;
  *) echo "usage: $0 [atorch]" >&2; exit 2 ;;
esac
python3 -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check -c constraints.txt "torch==2.13.0"
.venv/bin/pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[$extras]"
