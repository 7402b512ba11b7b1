# The two commands of the README. Both install what they need first (scripts/install.sh).
PY := .venv/bin/python
TOPOLOGY ?= topologies/default.yaml
# the reference topologies the conformance suite runs on, on every target this machine has
SUITE_TOPOLOGIES ?= topologies/conformance.yaml topologies/default.yaml
REPORT ?= reports

.PHONY: install lab test unit conformance bench soak p4 ptf clean

install:
	scripts/install.sh

lab: install
	.venv/bin/statelab up $(TOPOLOGY)

# unit, integration and self-tests once; then the conformance suite on every target whose
# switch is installed (`statelab targets --why` says which and why not), each topology with
# its own report directory: reports/<target>/<topology>/
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
