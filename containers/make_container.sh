#!/usr/bin/env bash
# `make container`: builds the CPU image (containers/Dockerfile.cpu, the same install.sh as the CUDA
# recipes) with podman on a Debian 12 base made here with debootstrap (no registry is needed), then
# runs containers/check.sh inside it: hpcforge --help, a 2-rank train and an evaluate.
#   - podman, runc and debootstrap: installed with apt when run as root on Debian, else one line
#     says what is missing (exit 2);
#   - the base (a debootstrap --variant=minbase bookworm tarball) and a pip cache for the build are
#     kept in ~/.cache/hpcforge/container, and the Horovod wheel `make setup` built
#     (~/.cache/hpcforge/wheels) is mounted into the build: a rebuild takes minutes;
#   - podman runs with runc and cgroupfs and no default ulimits (DESIGN.md), from a config file of
#     its own (CONTAINERS_CONF): /etc/containers is not changed.
# HPCFORGE_IMAGE (localhost/hpcforge:cpu) names the image; DEBIAN_MIRROR the mirror for the base.
#   bash containers/make_container.sh [build|check]   (both by default)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${HPCFORGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hpcforge}"
HERE="$CACHE/container"
IMAGE="${HPCFORGE_IMAGE:-localhost/hpcforge:cpu}"
BASE=localhost/hpcforge-base:bookworm   # containers/Dockerfile.cpu's FROM
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
TOOLS=(podman runc debootstrap)

log() { printf '[container] %s\n' "$*" >&2; }
have() { command -v "$1" >/dev/null 2>&1 || [[ -x "/usr/sbin/$1" ]]; }

need_tools() {
  local missing=() t
  for t in "${TOOLS[@]}"; do have "$t" || missing+=("$t"); done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  if [[ $(id -u) -eq 0 ]] && have apt-get; then
    log "apt: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    log "error: make container needs ${missing[*]} (not found); as root on Debian it installs them with apt, else install them (or build containers/Dockerfile.cpu with your site's engine)"
    exit 2
  fi
}

podman_conf() {
  mkdir -p "$HERE"
  printf '%s\n' '# written by containers/make_container.sh (see DESIGN.md: podman on this machine kind)' \
    '[containers]' 'default_ulimits = []' '' '[engine]' 'runtime = "runc"' \
    'cgroup_manager = "cgroupfs"' 'events_logger = "file"' > "$HERE/containers.conf"
  export CONTAINERS_CONF="$HERE/containers.conf"
}

# The Debian 12 base: a minbase debootstrap, kept as a tarball (about 40-120 s to make once).
base_image() {
  podman image exists "$BASE" && return 0
  local tarball="$HERE/debian-bookworm-minbase.tar"
  if [[ ! -s "$tarball" ]]; then
    log "base: debootstrap --variant=minbase bookworm from $MIRROR (once; kept in $tarball)"
    local rootfs="$HERE/rootfs.tmp"
    rm -rf "$rootfs"
    debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" >"$HERE/debootstrap.log" 2>&1 \
      || { log "error: debootstrap failed (log $HERE/debootstrap.log: $(tail -n1 "$HERE/debootstrap.log"))"; exit 1; }
    tar -C "$rootfs" -cf "$tarball.partial" . && mv "$tarball.partial" "$tarball"
    rm -rf "$rootfs"
  fi
  log "base: podman import $tarball as $BASE"
  podman import -q "$tarball" "$BASE" >/dev/null
}

# torch's CPU wheel for the image (Debian 12: Python 3.11), fetched by the host's pip: from
# download.pytorch.org, or from wherever this host's pip finds it (a local find-links, a proxy).
# Kept in $HERE/torch; the build installs it from there. Not fatal: the build then asks the index.
torch_wheel() {
  local version; version="$(sed -n 's/.*TORCH_VERSION=\([0-9.]*\).*/\1/p' "$ROOT/containers/Dockerfile.cpu")"
  mkdir -p "$HERE/torch"
  compgen -G "$HERE/torch/torch-$version+cpu-cp311-cp311-*.whl" >/dev/null && return 0
  local py="${PYTHON:-python3}"; [[ -x "$ROOT/.venv/bin/python" ]] && py="$ROOT/.venv/bin/python"
  log "torch: fetching the $version CPU wheel for the image into $HERE/torch"
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
    --platform "manylinux_2_28_$(uname -m)" "torch==$version+cpu" \
    --extra-index-url https://download.pytorch.org/whl/cpu -d "$HERE/torch" >"$HERE/torch.log" 2>&1 \
    || log "torch: not fetched here ($(grep -m1 ERROR "$HERE/torch.log" | cut -c1-160)); the build asks download.pytorch.org"
}

build() {
  mkdir -p "$CACHE/wheels" "$HERE/pip"
  torch_wheel
  log "build: $IMAGE from containers/Dockerfile.cpu (Horovod wheels from $CACHE/wheels)"
  local t0=$SECONDS
  # pip in the build trusts what the host's pip trusts (a site's TLS proxy signs with its own CA)
  local ca="${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}" cert=()
  [[ -r "$ca" ]] && cert=(-v "$ca:/opt/host-ca.crt:ro" --build-arg PIP_CERT=/opt/host-ca.crt)
  podman build --format docker -f "$ROOT/containers/Dockerfile.cpu" -t "$IMAGE" "${cert[@]}" \
    -v "$CACHE/wheels:/opt/wheels" -v "$HERE/torch:/opt/torch-wheels:ro" \
    -v "$HERE/pip:/root/.cache/pip" "$ROOT"
  log "build: $IMAGE in $((SECONDS - t0)) s"
}

check() {
  local t0=$SECONDS
  podman run --rm --entrypoint bash "$IMAGE" /opt/src/containers/check.sh
  log "check: hpcforge --help, prepare, a 2-rank train and evaluate inside $IMAGE in $((SECONDS - t0)) s"
}

main() {
  local what="${1:-all}"
  [[ "$what" =~ ^(all|build|check)$ ]] || { log "error: '$what': expected build, check or nothing (both)"; exit 2; }
  need_tools
  podman_conf
  if [[ "$what" != check ]]; then base_image; build; fi
  [[ "$what" == build ]] || check
}

main "$@"
