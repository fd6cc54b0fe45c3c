#!/usr/bin/env bash
# Copy the real X-rays of configs/real_images.yaml into out/real_images/<region>/, checking each
# sha256. Sources must be here already: the pydicom-data wheel in $REAL_IMAGES_WHEELS (default
# out/real_images/.wheels; brought with `pip download` when REAL_IMAGES_DOWNLOAD=1) and bare git
# mirrors in $REAL_IMAGES_MIRRORS (default /work/.mirror, as the search tool's fetch leaves them).
# A missing source stops it with one line naming the source and how to bring it.
# Looking only: never train or tune on these images (issue 16).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
if [[ "${REAL_IMAGES_DOWNLOAD:-0}" == 1 ]]; then
    wheels=${REAL_IMAGES_WHEELS:-out/real_images/.wheels}
    mkdir -p "$wheels"
    [[ -f "$wheels/pydicom_data-1.0.0-py3-none-any.whl" ]] ||
        "$PY" -m pip download --no-deps pydicom-data==1.0.0 -d "$wheels"
fi
exec "$PY" scripts/real_images.py fetch
