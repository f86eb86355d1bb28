#!/usr/bin/env bash
# Installs Schemathesis (pinned) into target/tools/schemathesis if it is not there yet.
# Used by `make test` for the API fuzz test (tests/it/api_fuzz.rs); idempotent.
set -euo pipefail
VERSION=4.32.5
DIR="$(cd "$(dirname "$0")/.." && pwd)/target/tools/schemathesis"
if [[ -x "$DIR/bin/st" ]] && "$DIR/bin/st" --version 2>/dev/null | grep -q "$VERSION"; then
    exit 0
fi
echo "[tools] installing schemathesis $VERSION into $DIR"
rm -rf "$DIR"
python3 -m venv "$DIR"
"$DIR/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$VERSION"
"$DIR/bin/st" --version
