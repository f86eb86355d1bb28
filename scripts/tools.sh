#!/usr/bin/env bash
# Installs the operations tools into target/tools/bin (idempotent, pinned versions):
#   helm      built with `go install` (the Go module proxy is reachable; release downloads are not)
#   promtool  extracted from Debian's `prometheus` package (the server is not installed or started)
#   asyncapi-specs  the official AsyncAPI JSON Schemas (npm), to validate docs/asyncapi.json
# Usage: scripts/tools.sh helm|promtool|asyncapi-specs|all   — prints nothing but errors; exits non-zero on failure.
set -euo pipefail
cd "$(dirname "$0")/.."

HELM_VERSION=v3.22.0
BIN="$PWD/target/tools/bin"
mkdir -p "$BIN"

log() { echo "[tools] $*" >&2; }
die() { echo "[tools] error: $*" >&2; exit 1; }

helm_tool() {
  if [[ -x $BIN/helm ]] && "$BIN/helm" version --short 2>/dev/null | grep -q "^${HELM_VERSION}"; then
    return
  fi
  # The Go toolchain's usual home, for shells whose PATH lacks it.
  [[ -x /usr/local/go/bin/go ]] && PATH="$PATH:/usr/local/go/bin"
  command -v go >/dev/null || die "go is needed to build helm (go install helm.sh/helm/v3/cmd/helm@${HELM_VERSION})"
  log "building helm ${HELM_VERSION} with go install (once; a few minutes)"
  GOBIN="$BIN" GOFLAGS=-mod=mod CGO_ENABLED=0 go install -ldflags "-X helm.sh/helm/v3/internal/version.version=${HELM_VERSION}" \
    "helm.sh/helm/v3/cmd/helm@${HELM_VERSION}" >"$BIN/../helm-build.log" 2>&1 \
    || { tail -n 20 "$BIN/../helm-build.log" >&2; die "go install helm failed; its log is target/tools/helm-build.log"; }
}

promtool_tool() {
  if [[ -x $BIN/promtool ]]; then
    return
  fi
  local work
  work="$(mktemp -d)"
  log "fetching promtool from Debian's prometheus package"
  if ! (cd "$work" && apt-get download prometheus >/dev/null 2>&1); then
    # The package lists may be missing on a fresh machine.
    apt-get update -qq >/dev/null 2>&1 || die "apt-get update failed"
    (cd "$work" && apt-get download prometheus >/dev/null 2>&1) || die "apt-get download prometheus failed"
  fi
  dpkg-deb -x "$work"/prometheus_*.deb "$work/root"
  install -m 0755 "$work/root/usr/bin/promtool" "$BIN/promtool"
  rm -rf "$work"
}

ASYNCAPI_SPECS_VERSION=6.11.1

# The official AsyncAPI JSON Schemas (npm @asyncapi/specs), to validate docs/asyncapi.json.
asyncapi_specs_tool() {
  local dir="$BIN/../asyncapi-specs-${ASYNCAPI_SPECS_VERSION}"
  if [[ -f $dir/schemas/3.0.0-without-\$id.json ]]; then
    return
  fi
  command -v npm >/dev/null || die "npm is needed to fetch @asyncapi/specs"
  local work
  work="$(mktemp -d)"
  log "fetching @asyncapi/specs ${ASYNCAPI_SPECS_VERSION} (npm pack)"
  (cd "$work" && npm pack --silent "@asyncapi/specs@${ASYNCAPI_SPECS_VERSION}" >/dev/null 2>&1) \
    || die "npm pack @asyncapi/specs@${ASYNCAPI_SPECS_VERSION} failed"
  tar xzf "$work"/asyncapi-specs-*.tgz -C "$work"
  rm -rf "$dir" && mkdir -p "$dir"
  cp -r "$work/package/schemas" "$dir/"
  rm -rf "$work"
}

case "${1:-all}" in
  helm) helm_tool ;;
  promtool) promtool_tool ;;
  asyncapi-specs) asyncapi_specs_tool ;;
  all) helm_tool; promtool_tool; asyncapi_specs_tool ;;
  *) die "unknown tool $1" ;;
esac
