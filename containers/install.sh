#!/usr/bin/env bash
# Installs hpcforge into the venv /opt/hpcforge of an image; Dockerfile and Apptainer.def (CUDA)
# and Dockerfile.cpu (CPU, `make container`) all run it, so the images are built the same way.
# Versions come from the recipe's environment:
#   TORCH_VERSION TORCH_INDEX HOROVOD_VERSION CMAKE_VERSION   (the recipes pin them; the tests check
#   them against pyproject.toml), and HOROVOD_GPU_OPERATIONS (NCCL in the CUDA recipes, empty on CPU).
# HOROVOD_WHEELS (optional): a folder of Horovod wheels built for this image's torch, Python and
#   MPI (make container mounts ~/.cache/hpcforge/wheels there); one that fits is installed instead
#   of a 6-10 minute build, and a wheel built here is left there for the next build.
# TORCH_WHEELS (optional): a folder holding torch's TORCH_VERSION wheel for this Python (make
#   container puts the host's there); it is installed from there (its dependencies from PyPI)
#   instead of from TORCH_INDEX.
# The project's source is at /opt/src; every other dependency is installed at the version
# pyproject.toml pins, by installing the project (not editable).
#   bash install.sh            everything (Apptainer.def)
#   bash install.sh deps       apt, the venv, torch and Horovod (a layer of its own: the project's
#   bash install.sh project    sources change more often, and this part then installs only them)
set -euo pipefail
: "${TORCH_VERSION:?}" "${TORCH_INDEX:?}" "${HOROVOD_VERSION:?}" "${CMAKE_VERSION:?}"
GPU_OPS="${HOROVOD_GPU_OPERATIONS:-}"
VENV=/opt/hpcforge
PIP="$VENV/bin/pip"
PHASE="${1:-all}"

py_tag() { python3 -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")'; }

# A wheel in HOROVOD_WHEELS for this image's Python (cp311, ...), if there is one.
reusable_wheel() {
  [[ -n "${HOROVOD_WHEELS:-}" ]] || return 1
  local py; py="$(py_tag)"
  compgen -G "$HOROVOD_WHEELS/horovod-$HOROVOD_VERSION-$py-$py-linux_*.whl" | head -n1
}

install_torch() {
  local py whl=""; py="$(py_tag)"
  [[ -n "${TORCH_WHEELS:-}" ]] && whl="$(compgen -G "$TORCH_WHEELS/torch-$TORCH_VERSION[+-]*$py-$py-*.whl" | head -n1 || true)"
  if [[ -n "$whl" ]]; then
    echo "torch: installing $whl"
    "$PIP" install "$whl"
  else
    "$PIP" install "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX"
  fi
}

deps() {
  export DEBIAN_FRONTEND=noninteractive
  apt-get update
  # OpenMPI from the distribution: built with PMIx, so `srun --mpi=pmix` wires the ranks.
  apt-get install -y --no-install-recommends python3 python3-venv ca-certificates openmpi-bin
  local whl; whl="$(reusable_wheel || true)"
  # A Horovod wheel to reuse needs no compiler.
  [[ -n "$whl" ]] || apt-get install -y --no-install-recommends \
    python3-dev build-essential git libopenmpi-dev
  rm -rf /var/lib/apt/lists/*

  python3 -m venv "$VENV"
  install_torch
  "$PIP" install wheel packaging cffi cloudpickle psutil pyyaml   # Horovod's own runtime deps

  if [[ -n "$whl" ]]; then
    echo "horovod: reusing $whl"
    "$PIP" install --no-deps "$whl"
  else
    build_horovod
  fi
  "$VENV/bin/horovodrun" --check-build | tee /opt/horovod-check-build.txt
  local needed=(PyTorch MPI Gloo); [[ -n "$GPU_OPS" ]] && needed+=("$GPU_OPS")
  for fw in "${needed[@]}"; do
    grep -Eq "\[X\] $fw" /opt/horovod-check-build.txt || { echo "horovod: $fw missing" >&2; exit 1; }
  done
  # The project's pinned dependencies, when its pyproject.toml is there already (Dockerfile.cpu
  # copies it before the sources): in this layer, a change to the sources does not reinstall them.
  if [[ -f /opt/src/pyproject.toml ]]; then
    local reqs; mapfile -t reqs < <("$VENV/bin/python" -c 'import tomllib
for d in tomllib.load(open("/opt/src/pyproject.toml", "rb"))["project"]["dependencies"]: print(d)')
    "$PIP" install "${reqs[@]}"
  fi
}

# Horovod's last release does not build against PyTorch 2.x as is (DESIGN.md, horovod#3996):
#  - CMake 4 rejects its bundled Gloo: build with cmake < 4;
#  - torch headers need C++17, its CMake asks for C++14 (fix #3998 merged, never released).
build_horovod() {
  "$PIP" install "cmake==$CMAKE_VERSION"
  local tmp; tmp="$(mktemp -d)"
  "$PIP" download --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$tmp"
  tar -xzf "$tmp/horovod-$HOROVOD_VERSION.tar.gz" -C "$tmp"
  local src="$tmp/horovod-$HOROVOD_VERSION"
  sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' \
    "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
  grep -q 'CMAKE_CXX_STANDARD 17' "$src/horovod/torch/CMakeLists.txt"
  local gpu=(); [[ -n "$GPU_OPS" ]] && gpu=(HOROVOD_GPU_OPERATIONS="$GPU_OPS")
  ( cd "$src" && env PATH="$VENV/bin:$PATH" "${gpu[@]}" \
      HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 \
      HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
      "$PIP" wheel --no-build-isolation --no-deps -w "$tmp/out" . )
  "$PIP" install --no-deps "$tmp"/out/horovod-*.whl
  if [[ -n "${HOROVOD_WHEELS:-}" && -w "${HOROVOD_WHEELS:-}" ]]; then   # kept for the next build
    cp "$tmp"/out/horovod-*.whl "$HOROVOD_WHEELS/.partial.whl"
    mv "$HOROVOD_WHEELS/.partial.whl" "$HOROVOD_WHEELS/$(basename "$tmp"/out/horovod-*.whl)"
  fi
  rm -rf "$tmp"
}

project() {
  # The project, not editable, with the versions pyproject.toml pins (torch/horovod already match).
  "$PIP" install /opt/src
  # configs/ ships inside the package (hpcforge/configs): the installed command finds it anywhere.
  "$VENV/bin/hpcforge" config >/dev/null
}

case "$PHASE" in
  all) deps; project ;;
  deps) deps ;;
  project) project ;;
  *) echo "install.sh: phase '$PHASE': expected deps, project or nothing (both)" >&2; exit 2 ;;
esac
