#!/usr/bin/env bash
# Create the reference environment for the side-by-side benchmark (idempotent).
#
#   bash bench/setup_reference.sh            # creates bench/.cache/ref-venv if needed
#   REF_VENV=/some/where bash bench/setup_reference.sh
#
# The venv uses --system-site-packages so torch / transformers / peft / nevergrad
# come from the system (no second torch). Into it go:
#   - lorahub==0.1.0 with --no-deps: its metadata declares the wrong dependency
#     `dataset` (a SQL toolkit that drags in SQLAlchemy and alembic); every real
#     dependency (transformers, peft, nevergrad, torch, pandas, numpy) is on the system;
#   - datasets: what lorahub.algorithm actually imports (`from datasets import Dataset`).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${REF_VENV:-$here/.cache/ref-venv}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null 2>&1 || python="python3"

if [[ ! -x "$venv/bin/python" ]]; then
    echo "creating $venv (system site packages)" >&2
    "$python" -m venv --system-site-packages "$venv"
fi

if ! "$venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('lorahub') != '0.1.0')" 2>/dev/null; then
    "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps "lorahub==0.1.0"
fi
if ! "$venv/bin/python" -c "import datasets" 2>/dev/null; then
    "$venv/bin/pip" install --quiet --disable-pip-version-check datasets
fi

# Smoke check: the reference imports, and nothing replaced the system torch.
"$venv/bin/python" - <<'EOF'
import importlib.metadata as m
import torch, transformers, peft, nevergrad, datasets
import lorahub.algorithm  # noqa: F401
print(f"ref-venv ok: lorahub {m.version('lorahub')}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}, peft {peft.__version__}, "
      f"nevergrad {nevergrad.__version__}, datasets {datasets.__version__}")
EOF
