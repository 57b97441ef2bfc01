# make run: set up .venv and run the default experiment on $(NP) ranks.
# make test: set up .venv and run every test (plain pytest, then MPI tests on 2 and 4 ranks).
# make slurm-up (root): install SLURM and start a one-node cluster on loopback; make test-slurm: the
# SLURM tests alone (without a cluster they skip, saying so). See docs/slurm.md.
#
# TORCH_SPEC picks the torch build: plain "torch" keeps a GPU user's CUDA build; CI sets
# TORCH_SPEC=torch==2.13.0 to take the local CPU wheel. EXTRAS=test,mpi installs MPICH from
# PyPI; on a cluster use EXTRAS=test and an mpi4py built against the site MPI (see README).

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch
EXTRAS ?= test,mpi
NP ?= 4
CONFIG ?= configs/default.yaml
MPIEXEC_TIMEOUT ?= 600
PY := $(VENV)/bin/python
MPIEXEC := $(VENV)/bin/mpiexec
PYTEST_MPI := $(PY) -m pytest -q -p no:cacheprovider --with-mpi tests/mpi

.PHONY: venv run test test-unit test-mpi test-slurm slurm-up bench lint clean

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

run: venv
	$(VENV)/bin/pfl-mpi run $(CONFIG) -n $(NP) --resume-if-exists

test: venv test-unit test-mpi

test-unit: venv
	$(PY) -m pytest -q --durations=20

test-mpi: venv
	MPIEXEC_TIMEOUT=$(MPIEXEC_TIMEOUT) $(MPIEXEC) -n 2 $(PYTEST_MPI)
	MPIEXEC_TIMEOUT=$(MPIEXEC_TIMEOUT) $(MPIEXEC) -n 4 $(PYTEST_MPI)

slurm-up:
	.ci/slurm-up.sh

test-slurm: venv
	$(PY) -m pytest -q -p no:cacheprovider tests/test_slurm.py

bench: venv
	$(PY) benchmarks/throughput.py
	$(MPIEXEC) -n 2 $(PY) benchmarks/reduce_bandwidth.py

lint: venv
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs *.egg-info
