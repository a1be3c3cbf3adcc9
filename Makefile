# An index of the README's commands.
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
# CPU-only machine elsewhere: make install-cpu TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu"
TORCH_INDEX ?=

.PHONY: install install-cpu math test demo bench bench-gpu

install:            ## GPU or default machine: torch from PyPI, plus the test/bench tools
	$(PYTHON) -m pip install -r requirements-dev.txt

install-cpu:        ## pin the CPU torch first (fast where it is on disk), then the rest
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q torch==$(TORCH_VERSION) $(TORCH_INDEX)
	$(PYTHON) -m pip install -q -r requirements-dev.txt

math:               ## the math check alone: every formula against an independent computation, seconds
	$(PYTHON) -m pytest -q -m math test_ddpm.py

test:               ## the math check and everything else; a couple of minutes on 2 cores
	$(PYTHON) -m pytest -q test_ddpm.py

# The offline CPU demo: 8x8 digits; writes runs/demo/samples-0001000.png and prints the test bits/dim.
# Two single-threaded DDP processes (gloo), one per core: at 8x8 a second intra-op thread mostly waits at
# barriers (on a shared 2-core machine one process with 2 threads measured 3x slower than with 1).
DEMO_PROCS ?= 2
demo:               ## train the digits preset on 2 CPU cores (5-10 min), then samples and test NLL
	rm -rf runs/demo
	OMP_NUM_THREADS=1 $(PYTHON) -m torch.distributed.run --standalone --nproc_per_node=$(DEMO_PROCS) \
		ddpm.py train --preset digits --out runs/demo

bench:              ## ours vs diffusers on the CIFAR-10 network, CPU, batch 16, fp32 and bf16 (3-5 min on 2 cores)
	$(PYTHON) bench.py

bench-gpu:          ## the same on CUDA at the paper's batch 128, plus bf16+compile and 50k-sample times
	$(PYTHON) bench.py --device cuda
