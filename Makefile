# The two commands of the README. Both install what they need first (scripts/install.sh).
PY := .venv/bin/python
TOPOLOGY ?= topologies/default.yaml
# the reference topologies the conformance suite runs on, on every target this machine has
SUITE_TOPOLOGIES ?= topologies/conformance.yaml topologies/default.yaml
# and once more the reference, every tenant's state on a Redis Cluster (--state cluster=3)
REFERENCE ?= topologies/conformance.yaml
REPORT ?= reports

.PHONY: install lab test unit conformance bench soak p4 ptf clean

install:
	scripts/install.sh

lab: install
	.venv/bin/statelab up $(TOPOLOGY)

# unit, integration and self-tests once; then the conformance suite on every target whose
# switch is installed (`statelab targets --why` says which and why not), each topology with
# its own report directory: reports/<target>/<topology>/; and the reference once on OVS with
# its state on Redis Clusters: reports/ovs/conformance-cluster3/
test: install
	$(PY) -m pytest tests
	@$(MAKE) --no-print-directory conformance

conformance:
	@status=0; for t in $$(.venv/bin/statelab targets); do \
	  for topo in $(SUITE_TOPOLOGIES); do \
	    out=$(REPORT)/$$t/$$(basename $$topo .yaml); \
	    echo "== conformance suite on $$t, $$topo (report in $$out)"; \
	    $(PY) -m pytest conformance --target $$t --topology $$topo --report $$out || status=1; \
	  done; \
	done; \
	out=$(REPORT)/ovs/conformance-cluster3; \
	echo "== conformance suite on ovs, $(REFERENCE) with every tenant's state on a 3-node Redis Cluster (report in $$out)"; \
	$(PY) -m pytest conformance --target ovs --topology $(REFERENCE) --state cluster=3 --report $$out || status=1; \
	.venv/bin/statelab targets --why | grep -v ': ready$$' | sed 's/^/== not run: /'; \
	exit $$status

# the benchmark (bench/): P1-P5 as ratios from one run, a table and reports/bench.json
bench: install
	$(PY) -m bench --json $(REPORT)/bench.json

# 1000 faults in a row under load (bench/soak.py); counts printed and in reports/soak.json
soak: install
	$(PY) -m bench.soak --events 1000 --json $(REPORT)/soak.json

unit: install
	$(PY) -m pytest tests -m "not root"

# the P4 program's committed compiler outputs (needs p4c) and its PTF tests (needs bmv2)
p4:
	$(MAKE) -C p4

ptf: install
	$(MAKE) -C p4 ptf

clean:
	-.venv/bin/statelab clean
