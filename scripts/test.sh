#!/usr/bin/env bash
# Set up (.venv with pinned dependencies, ATorch included) and run the test suite. Extra arguments go to pytest.
# MFTCODER_REQUIRE_ATORCH=1 makes the ATorch tests fail rather than skip if ATorch did not install.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh atorch
status=0
MFTCODER_REQUIRE_ATORCH=1 .venv/bin/python -m pytest -q "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: treating that as a failure" >&2
  exit 1
fi
exit "$status"
