#!/usr/bin/env bash
# Sets up everything hpcforge needs on a fresh Debian 12 machine, idempotently:
#   1. apt packages (OpenMPI for Horovod and mpi4py),
#   2. a venv at .venv with the pinned packages,
#   3. Horovod 0.28.1 built from its sdist for PyTorch 2.x (cached wheel, reused).
# A second run checks stamps and returns in about a second.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${HPCFORGE_VENV:-$ROOT/.venv}"
CACHE="${HPCFORGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hpcforge}"
WHEELS="$CACHE/wheels"
PY="${PYTHON:-python3}"
HOROVOD_VERSION=0.28.1
TORCH_VERSION=2.13.0
APT_PACKAGES=(openmpi-bin libopenmpi-dev)

log() { printf '[bootstrap] %s\n' "$*" >&2; }

apt_missing() {
  local missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  echo "${missing[@]:-}"
}

install_apt() {
  local missing; missing="$(apt_missing)"
  [[ -z "$missing" ]] && return 0
  log "apt: installing $missing"
  local sudo=""; [[ $(id -u) -ne 0 ]] && sudo="sudo"
  $sudo apt-get update -qq
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends $missing >/dev/null
}

# The venv is rebuilt when pyproject.toml changes: its hash is the stamp.
stamp_of() { sha256sum "$ROOT/pyproject.toml" "$ROOT/scripts/bootstrap.sh" | sha256sum | cut -c1-16; }

# Horovod 0.28.1 does not build against PyTorch >= 2.1 as released:
#  - CMake 4 rejects its bundled Gloo -> build with cmake<4 in the venv;
#  - torch headers need C++17, Horovod asks for C++14 (horovod#3996, fix #3998 never released).
build_horovod_wheel() {
  local tmp; tmp="$(mktemp -d)"
  log "horovod: building $HOROVOD_VERSION wheel from sdist (about 6-10 min on 2 cores)"
  "$VENV/bin/pip" install -q "cmake>=3.13,<4" wheel
  "$VENV/bin/pip" download -q --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$tmp"
  tar -xzf "$tmp"/horovod-"$HOROVOD_VERSION".tar.gz -C "$tmp"
  local src="$tmp/horovod-$HOROVOD_VERSION"
  sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' \
    "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
  grep -q 'CMAKE_CXX_STANDARD 17' "$src/horovod/torch/CMakeLists.txt" \
    || { log "horovod: C++17 patch did not apply"; exit 1; }
  mkdir -p "$WHEELS"
  ( cd "$src" && PATH="$VENV/bin:$PATH" \
      HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 \
      HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
      "$VENV/bin/pip" wheel -q --no-build-isolation --no-deps -w "$tmp/out" . )
  # Write under a temporary name, then rename: a killed build never leaves a wheel that looks good.
  local whl; whl="$(ls "$tmp"/out/horovod-*.whl)"
  cp "$whl" "$WHEELS/.partial.whl" && mv "$WHEELS/.partial.whl" "$WHEELS/$(basename "$whl")"
  rm -rf "$tmp"
}

install_venv() {
  local stamp; stamp="$(stamp_of)"
  if [[ -f "$VENV/.hpcforge-stamp" && "$(cat "$VENV/.hpcforge-stamp")" == "$stamp" ]]; then
    return 0
  fi
  [[ -x "$VENV/bin/python" ]] || { log "venv: creating $VENV"; "$PY" -m venv "$VENV"; }
  "$VENV/bin/pip" install -q --upgrade pip
  # torch first, pinned: an unpinned torch pulls a multi-GB CUDA build; clusters see README.
  "$VENV/bin/pip" install -q "torch==$TORCH_VERSION"
  if ! "$VENV/bin/python" -c "import horovod.torch" 2>/dev/null; then
    ls "$WHEELS"/horovod-"$HOROVOD_VERSION"-*.whl >/dev/null 2>&1 || build_horovod_wheel
    "$VENV/bin/pip" install -q --no-deps "$WHEELS"/horovod-"$HOROVOD_VERSION"-*.whl
    "$VENV/bin/pip" install -q cloudpickle psutil pyyaml packaging cffi  # horovod's own runtime deps
  fi
  log "venv: installing hpcforge and its pinned dependencies"
  "$VENV/bin/pip" install -q --find-links "$WHEELS" -e "$ROOT[dev]"
  "$VENV/bin/horovodrun" --check-build | tee "$CACHE/check-build.txt" >&2
  for fw in "PyTorch" "MPI" "Gloo"; do
    grep -Eq "\[X\] $fw" "$CACHE/check-build.txt" || { log "horovod: $fw support missing"; exit 1; }
  done
  echo "$stamp" > "$VENV/.hpcforge-stamp"
  log "ready: $VENV"
}

main() {
  mkdir -p "$CACHE"
  install_apt
  install_venv
}
main "$@"
