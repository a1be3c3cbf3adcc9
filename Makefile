# An index of the README's commands.
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
# CPU-only machine elsewhere: make install-cpu TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu"
TORCH_INDEX ?=

.PHONY: install install-cpu test demo table2 steps bench bench-gpu

install:            ## GPU or default machine: torch from PyPI, plus the test/bench tools
	$(PYTHON) -m pip install -r requirements-dev.txt

install-cpu:        ## pin the CPU torch first (fast where it is on disk), then the rest
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q torch==$(TORCH_VERSION) $(TORCH_INDEX)
	$(PYTHON) -m pip install -q -r requirements-dev.txt

test:               ## the math check and everything else; a few minutes on 2 cores
	$(PYTHON) -m pytest -q test_ddpm.py

# The offline CPU demo: 8x8 digits; writes runs/demo/samples-0001000.png, then prints the test bits/dim and the
# samples' digits-FD, each beside its reference points (docs/evidence.md).
# Two single-threaded DDP processes (gloo), one per core: at 8x8 a second intra-op thread mostly waits at
# barriers (on a shared 2-core machine one process with 2 threads measured 3x slower than with 1). The scoring
# that follows runs single-threaded for the same reason.
DEMO_PROCS ?= 2
demo:               ## train the digits preset on 2 CPU cores, then test NLL and sample score (6-10 min)
	rm -rf runs/demo
	OMP_NUM_THREADS=1 $(PYTHON) -m torch.distributed.run --standalone --nproc_per_node=$(DEMO_PROCS) \
		ddpm.py train --preset digits --out runs/demo --eval-bpd 0
	OMP_NUM_THREADS=1 $(PYTHON) evaluate.py digits-score --checkpoint runs/demo/ckpt-0001000.pt --device cpu

table2:             ## Table 2 on digits: 7 objectives trained, sampled and scored, 2 at a time (40-60 min)
	nice -n 10 $(PYTHON) evaluate.py table2 --out runs/table2

steps:              ## digits-FD of the demo's checkpoint at 1000 ... 10 sampling steps, ancestral and DDIM
	OMP_NUM_THREADS=1 $(PYTHON) evaluate.py steps --checkpoint runs/demo/ckpt-0001000.pt --device cpu

bench:              ## ours vs diffusers on the CIFAR-10 network, CPU, batch 16, fp32 and bf16 (3-5 min on 2 cores)
	$(PYTHON) bench.py

bench-gpu:          ## the same on CUDA at the paper's batch 128, plus bf16+compile and 50k-sample times
	$(PYTHON) bench.py --device cuda
