#!/usr/bin/env bash
# Runs inside the image (make container does): the CLI, a small Ising dataset, a 2-rank train
# (Horovod over the image's OpenMPI) and an evaluate. Small settings, about a minute on 2 cores.
#   podman run --rm --entrypoint bash hpcforge:cpu /opt/src/containers/check.sh [OUT]
set -euo pipefail
out="${1:-/tmp/hpcforge-check}"
small=(output_dir="$out" data.params.lattice=16 data.params.burn_in=40 data.params.decorrelation=4
       data.n_samples=640 data.chunk_size=64 data.shard_size=128 data.dask.n_workers=2
       data.dask.progress=false model.image_size=16)
step() { printf '[container] %s\n' "$*" >&2; }

step "hpcforge --help"
hpcforge --help | head -n1
step "prepare (Ising 16x16, 640 samples)"
hpcforge prepare -e demo "${small[@]}" data.overwrite=true
rm -rf "$out/train"
step "train: 2 ranks, train.dist.backend=horovod"
hpcforge train -e demo "${small[@]}" train.epochs=1 train.dist.nproc=2 train.dist.backend=horovod
step "evaluate"
hpcforge evaluate "$out/train/checkpoints/final.pt"
python - "$out" <<'PY'
import json, sys
s = json.load(open(f"{sys.argv[1]}/train/summary.json"))
e = json.load(open(f"{sys.argv[1]}/train/checkpoints/final.eval.json"))
print(f"[container] ok: {s['steps']} steps on {s['ranks']} ranks; evaluation: {sorted(e)[:4]}")
PY
