#!/usr/bin/env bash
# Create .venv and install mftcoder with the exact tested versions (constraints.txt; pyproject.toml holds only
# ranges). torch==2.13.0 goes in first: an unpinned torch (pulled through peft/accelerate) would be a
# multi-GB CUDA build. The qlora extra (bitsandbytes, CPU-capable) is in so that the QLoRA tests run; plot (matplotlib) draws curves.png.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check -c constraints.txt "torch==2.13.0"
.venv/bin/pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test,qlora,plot,eval]"
