#!/usr/bin/env bash
# Run the side-by-side benchmark from anywhere: bench/run.sh [--preset smoke|full] [bench.py options...]
# Results: the table on stdout, JSON in bench/out/results.json (or --out FILE).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "${here}/.."
exec "${PYTHON:-python3}" bench/bench.py "$@"
