# An index of the README's commands. Every target installs what is missing first (make install).
PYTHON ?= python3
PIP = $(PYTHON) -m pip install -q
# torch: `auto` takes PyPI's default (CUDA) build where nvidia-smi finds a GPU and the CPU build elsewhere;
# `make install TORCH=cpu` or `TORCH=cuda` chooses. The CPU build is TORCH_VERSION: a local wheel where pip's
# find-links hold one (tried with --no-index, so it fails at once elsewhere), else PyTorch's CPU index.
TORCH ?= auto
TORCH_MIN = 2.1
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
# The import names of requirements-dev.txt's packages.
MODULES = torch numpy scipy pytest hypothesis sklearn PIL tqdm matplotlib diffusers safetensors

# Exits 1 and names what is missing when a module in argv cannot be found (or torch is older than TORCH_MIN);
# it imports nothing, so the check takes a fraction of a second.
define CHECK_PY
import sys, importlib.util, importlib.metadata
missing = [name for name in sys.argv[1:] if importlib.util.find_spec(name) is None]
if "torch" in sys.argv[1:] and "torch" not in missing:
    version = importlib.metadata.version("torch").split("+")[0].split(".")
    if (int(version[0]), int(version[1])) < tuple(map(int, "$(TORCH_MIN)".split("."))):
        missing.append("torch>=$(TORCH_MIN) (found " + importlib.metadata.version("torch") + ")")
if missing:
    print("installing: " + ", ".join(missing))
sys.exit(1 if missing else 0)
endef
export CHECK_PY
CHECK = $(PYTHON) -c "$$CHECK_PY"

.PHONY: install install-cpu math test stats demo table2 steps bench bench-gpu

install:            ## idempotent: torch for this machine, then requirements-dev.txt; only when something is missing
	@$(CHECK) $(MODULES) || { \
	  if ! $(CHECK) torch >/dev/null; then \
	    target=$(TORCH); \
	    if [ $$target = auto ]; then if nvidia-smi -L >/dev/null 2>&1; then target=cuda; else target=cpu; fi; fi; \
	    if [ $$target = cuda ]; then $(PIP) "torch>=$(TORCH_MIN)"; \
	    else { $(PIP) --no-index --no-deps torch==$(TORCH_VERSION) 2>/dev/null && $(PIP) torch==$(TORCH_VERSION); } \
	      || $(PIP) torch==$(TORCH_VERSION) --index-url $(TORCH_CPU_INDEX); fi || exit 1; \
	  fi; \
	  $(PIP) -r requirements-dev.txt; }

install-cpu:        ## the same with the CPU build of torch, even where there is a GPU
	@$(MAKE) --no-print-directory install TORCH=cpu

math: install       ## the math check alone: every formula against an independent computation, seconds
	$(PYTHON) -m pytest -q -m math test_ddpm.py

test: install       ## the whole suite: the math check and everything else; a couple of minutes on 2 cores
	$(PYTHON) -m pytest -q test_ddpm.py

stats:              ## ddpm.py's lines of code by section and the README's length, against their aims (no install)
	$(PYTHON) .ci/stats.py

# The offline CPU demo: 8x8 digits. Training runs as two single-threaded DDP processes (gloo), one per core: at 8x8 a
# second intra-op thread helps training little (docs/training.md). It skips the in-training sample grid (64 samples on one core while
# the other waits); the scoring that follows draws 256 samples with both cores' threads, prints the test bits/dim and
# the samples' digits-FD, each beside its reference points (docs/evidence.md), and writes
# runs/demo/ckpt-0001000-digits-score/samples.png.
DEMO_PROCS ?= 2
demo: install       ## train the digits preset on 2 CPU cores, then test NLL and sample score (about 10 min)
	rm -rf runs/demo
	OMP_NUM_THREADS=1 $(PYTHON) -m torch.distributed.run --standalone --nproc_per_node=$(DEMO_PROCS) \
		ddpm.py train --preset digits --out runs/demo --sample-every 0
	$(PYTHON) evaluate.py digits-score --checkpoint runs/demo/ckpt-0001000.pt --device cpu

table2: install     ## Table 2 on digits: 7 objectives trained, sampled and scored, 2 at a time (about 55 min)
	nice -n 10 $(PYTHON) experiments.py table2 --out runs/table2

steps: install      ## digits-FD of the demo's checkpoint at 1000 ... 10 sampling steps, ancestral and DDIM
	$(PYTHON) experiments.py steps --checkpoint runs/demo/ckpt-0001000.pt --device cpu

bench: install      ## ours vs diffusers on the CIFAR-10 network, CPU, batch 16, fp32 and bf16 (3-5 min on 2 cores)
	$(PYTHON) bench.py

bench-gpu: install  ## the same on CUDA at the paper's batch 128, plus bf16+compile and 50k-sample times
	$(PYTHON) bench.py --device cuda
