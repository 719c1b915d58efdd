# The two README commands: `make demo` and `make test`. Both set up what is missing first.
VENV   ?= .venv
BIN    := $(VENV)/bin
# pytest arguments, e.g. `make test PYTEST_ARGS="-m 'not slow'"`
PYTEST_ARGS ?=

.PHONY: setup demo test bench gpu-check container clean

setup:
	@bash scripts/bootstrap.sh

demo: setup
	$(BIN)/hpcforge prepare -e demo_generator data.overwrite=true
	rm -rf outputs/demo/train  # the demo trains a fresh run each time (a used output_dir is refused)
	$(BIN)/hpcforge train -e demo_generator
	$(BIN)/hpcforge evaluate outputs/demo/train/checkpoints/final.pt --per-t 128
	$(BIN)/hpcforge report outputs/demo --out outputs/demo/report.html
	@echo
	@echo "Results of the demo:"
	@echo "  dataset     outputs/demo/data/ising2d-splits.zarr  (Zarr v3; attrs['hpcforge'] holds splits, stats, provenance)"
	@echo "  checkpoint  outputs/demo/train/checkpoints/final.pt"
	@echo "  metrics     outputs/demo/train/metrics.jsonl, outputs/demo/train/summary.json"
	@echo "  W&B run     outputs/demo/train/wandb/latest-run  (offline; upload with: $(BIN)/wandb sync outputs/demo/train/wandb/latest-run)"
	@echo "  images      outputs/demo/train/wandb/latest-run/files/media/images/"
	@echo "  evaluation  outputs/demo/train/checkpoints/final.eval.json  (W1 of m, |m|, E against the real-vs-real floor, thermodynamic curves, Frechet)"
	@echo "  figures     outputs/demo/train/checkpoints/final.eval/  (observables.png: histograms real vs generated; thermo_curves.png: <|m|>, <E>, C, chi against T)"
	@echo "  report      outputs/demo/report.html  (self-contained: open it in a browser, no network needed)"
	@echo
	@$(BIN)/python -c "import json; notes = json.load(open('outputs/demo/train/checkpoints/final.eval.json'))['notes']; print(*[n for n in notes if n.startswith(('precise', 'verdict'))], sep='\n')"

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: setup
	$(BIN)/hpcforge bench

# On a GPU node: NCCL all-reduce (Horovod vs torch.distributed), bf16, torch.compile, and steps/s
# against a plain PyTorch loop, one table (benchmarks/gpu_check.py). Elsewhere: one line, exit 0.
gpu-check: setup
	@$(BIN)/python -m benchmarks.gpu_check

# The CPU image (containers/Dockerfile.cpu, the same install.sh as the CUDA recipes) built with
# podman on a Debian 12 base made with debootstrap, then hpcforge --help, a 2-rank train and an
# evaluate inside it (containers/make_container.sh; as root on Debian it installs podman with apt).
container:
	@bash containers/make_container.sh

clean:
	rm -rf outputs
