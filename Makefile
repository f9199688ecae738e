# Two commands on a fresh machine: `make demo` and `make test`.
# Every environment they need is created here, idempotently.
SHELL := /bin/bash
PY311 ?= python3.11
VENV := .venv
LAVA_VENV := .venv-lava
NETX_VENV := .venv-netx
CLUSTER_VENV := .venv-cluster
PEERS_VENV := .venv-peers
EMBODY_VENV := .venv-embody
PY := $(VENV)/bin/python
TORCH_SPEC := torch==2.13.0
LAVA_SPEC := lava-nc==0.10.0

.PHONY: all venv lava-env netx-env cluster-env demo test test-fast test-netx test-cluster test-peers peers-env bench bench-peers bench-train embody-env test-embodied demo-embodied clean

all: venv lava-env

# Main env (Python 3.11). torch is installed first and pinned: any other spec
# would pull a multi-GB CUDA build.
$(VENV)/.stamp: pyproject.toml
	test -x $(PY) || $(PY311) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@
venv: $(VENV)/.stamp

# Lava env (Python 3.10 + lava-nc 0.10.0), used only through exporters/lava_worker.
$(LAVA_VENV)/.stamp:
	test -x $(LAVA_VENV)/bin/python || $$(PYTHON310=$${PYTHON310:-}; [ -n "$$PYTHON310" ] && echo $$PYTHON310 || scripts/find_python310.sh) -m venv $(LAVA_VENV)
	$(LAVA_VENV)/bin/python -m pip install -q --upgrade pip
	$(LAVA_VENV)/bin/python -m pip install -q $(LAVA_SPEC) h5py
	touch $@
lava-env: $(LAVA_VENV)/.stamp

# Optional: lava-dl netx loader (torch 2.3 + CUDA libraries, ~5.6 GB). Not part of make test.
$(NETX_VENV)/.stamp:
	test -x $(NETX_VENV)/bin/python || $$(scripts/find_python310.sh) -m venv $(NETX_VENV)
	$(NETX_VENV)/bin/python -m pip install -q --upgrade pip
	$(NETX_VENV)/bin/python -m pip install -q $(LAVA_SPEC) lava-dl==0.6.0 h5py
	touch $@
netx-env: $(NETX_VENV)/.stamp

# A Python 3.11 env $(1) with the packages $(2); the constraints file keeps torch at
# the local CPU build (any other torch spec, also one pulled in by a package, brings CUDA).
define pinned_venv
	test -x $(1)/bin/python || $(PY311) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip
	echo "$(TORCH_SPEC)" > $(1)/constraints.txt
	$(1)/bin/python -m pip install -q -c $(1)/constraints.txt $(TORCH_SPEC)
	$(1)/bin/python -m pip install -q -c $(1)/constraints.txt $(2)
	touch $(1)/.stamp
endef

# Optional: Ray for `experiment run --ray-address` (dmn-neuro[cluster]). Not part of make test.
CLUSTER_PKGS := -e '.[dev,cluster]'
$(CLUSTER_VENV)/.stamp: pyproject.toml
	$(call pinned_venv,$(CLUSTER_VENV),$(CLUSTER_PKGS))
cluster-env: $(CLUSTER_VENV)/.stamp

# Optional: the peer SNN libraries for `make bench-peers` (Norse, SpikingJelly). Not part of make test.
# (`pip install norse` alone pulls a CUDA torch through torchvision.)
PEERS_PKGS := -e '.[dev]' norse spikingjelly
$(PEERS_VENV)/.stamp: pyproject.toml
	$(call pinned_venv,$(PEERS_VENV),$(PEERS_PKGS))
peers-env: $(PEERS_VENV)/.stamp

# Optional: the NeuroMechFly body (flygym-gymnasium 1.3.2, MuJoCo) for `dmn-neuro embody`
# (dmn-neuro[embody]). Not part of make test / make demo.
EMBODY_PKGS := -e '.[dev,embody]'
$(EMBODY_VENV)/.stamp: pyproject.toml
	$(call pinned_venv,$(EMBODY_VENV),$(EMBODY_PKGS))
embody-env: $(EMBODY_VENV)/.stamp

demo: venv lava-env
	$(PY) examples/demo.py --out demo_out

test: venv lava-env
	DMN_LAVA_PYTHON=$(CURDIR)/$(LAVA_VENV)/bin/python $(VENV)/bin/pytest -q

test-netx: venv netx-env
	DMN_NETX_PYTHON=$(CURDIR)/$(NETX_VENV)/bin/python $(VENV)/bin/pytest -q -m netx

# Starts a local Ray instance and runs a tiny experiment grid through it.
test-cluster: cluster-env
	$(CLUSTER_VENV)/bin/pytest -q -m cluster tests/test_experiment_cluster.py

# One short episode in the body end to end, and the odor-side -> turn wiring (tests/test_embodied.py).
test-embodied: embody-env
	MUJOCO_GL=egl $(EMBODY_VENV)/bin/pytest -q -m embodied tests/test_embodied.py

# The shipped body navigator in the body: 4 held-out episodes with odor, a video of one.
demo-embodied: embody-env
	MUJOCO_GL=egl $(EMBODY_VENV)/bin/dmn-neuro --threads 1 embody examples/pretrained/flywire_mb_navigator_body \
		--calibration examples/embodied/body_calibration.json --episodes 4 --video --out demo_embodied_out

bench: venv
	$(PY) benchmarks/bptt.py

# The peer libraries run the engine's dynamics (tests/test_peers.py).
test-peers: peers-env
	$(PEERS_VENV)/bin/pytest -q -m peers tests/test_peers.py

# The engine against a compiled plain loop, Norse and SpikingJelly (matched semantics).
bench-peers: peers-env
	$(PEERS_VENV)/bin/python benchmarks/bptt.py --peers --json

bench-train: venv
	$(PY) benchmarks/train.py --json

clean:
	rm -rf $(VENV) $(LAVA_VENV) $(NETX_VENV) $(CLUSTER_VENV) $(PEERS_VENV) $(EMBODY_VENV) demo_out demo_embodied_out
