#!/usr/bin/env bash
# Set up (.venv with pinned dependencies, ATorch included; .venv-image with the GPU machine's packages for the GPU
# check's rehearsal) and run the test suite. Extra arguments go to pytest. MFTCODER_REQUIRE_ATORCH=1 and
# MFTCODER_REQUIRE_IMAGE_ENV=1 make the ATorch tests and the rehearsal fail rather than skip where those did not install.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh atorch
bash scripts/setup.sh image || echo "warning: .venv-image (the GPU machine's packages) did not install; its rehearsal test will fail" >&2
status=0
MFTCODER_REQUIRE_ATORCH=1 MFTCODER_REQUIRE_IMAGE_ENV=1 .venv/bin/python -m pytest -q "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: treating that as a failure" >&2
  exit 1
fi
exit "$status"
