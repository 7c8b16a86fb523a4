#!/usr/bin/env bash
# Run a command inside cdcca_ros's environment, after making sure it is set up and built.
# Usage: tools/run.sh 'python -m pytest test -k msgs'
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$ROOT/tools/setup.sh"
cd "$ROOT"
# shellcheck disable=SC1091
. "$ROOT/tools/env.sh"
exec bash -c "$*"
