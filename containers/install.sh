#!/usr/bin/env bash
# Installs hpcforge into the venv /opt/hpcforge of a CUDA image; Dockerfile and Apptainer.def both
# run it, so the two images are built the same way. Versions come from the recipe's environment:
#   TORCH_VERSION TORCH_INDEX HOROVOD_VERSION CMAKE_VERSION   (the recipes pin them; the tests check
#   them against pyproject.toml). The project's source is at /opt/src; every other dependency is
#   installed at the version pyproject.toml pins, by installing the project (not editable).
set -euo pipefail
: "${TORCH_VERSION:?}" "${TORCH_INDEX:?}" "${HOROVOD_VERSION:?}" "${CMAKE_VERSION:?}"
VENV=/opt/hpcforge
PIP="$VENV/bin/pip"

export DEBIAN_FRONTEND=noninteractive
apt-get update
# OpenMPI from the distribution: built with PMIx, so `srun --mpi=pmix` wires the ranks.
apt-get install -y --no-install-recommends \
  python3 python3-venv python3-dev build-essential git ca-certificates openmpi-bin libopenmpi-dev
rm -rf /var/lib/apt/lists/*

python3 -m venv "$VENV"
"$PIP" install --no-cache-dir "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX"

# Horovod's last release does not build against PyTorch 2.x as is (DESIGN.md, horovod#3996):
#  - CMake 4 rejects its bundled Gloo: build with cmake < 4;
#  - torch headers need C++17, its CMake asks for C++14 (fix #3998 merged, never released).
"$PIP" install --no-cache-dir "cmake==$CMAKE_VERSION" wheel packaging cffi cloudpickle psutil pyyaml
tmp="$(mktemp -d)"
"$PIP" download --no-cache-dir --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$tmp"
tar -xzf "$tmp/horovod-$HOROVOD_VERSION.tar.gz" -C "$tmp"
src="$tmp/horovod-$HOROVOD_VERSION"
sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' \
  "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
grep -q 'CMAKE_CXX_STANDARD 17' "$src/horovod/torch/CMakeLists.txt"
( cd "$src" && PATH="$VENV/bin:$PATH" \
    HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 \
    HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
    "$PIP" install --no-cache-dir --no-build-isolation --no-deps . )
rm -rf "$tmp"
"$VENV/bin/horovodrun" --check-build | tee /opt/horovod-check-build.txt
for fw in PyTorch MPI Gloo NCCL; do
  grep -Eq "\[X\] $fw" /opt/horovod-check-build.txt || { echo "horovod: $fw missing" >&2; exit 1; }
done

# The project, not editable, with the versions pyproject.toml pins (torch/horovod already match).
"$PIP" install --no-cache-dir /opt/src
# configs/ ships inside the package (hpcforge/configs): the installed command finds it anywhere.
"$VENV/bin/hpcforge" config >/dev/null
