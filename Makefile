# The two commands of the README. Both install what they need first (scripts/install.sh).
PY := .venv/bin/python
TOPOLOGY ?= topologies/default.yaml
TARGET ?= ovs
REPORT ?= reports

.PHONY: install lab test unit clean

install:
	scripts/install.sh

lab: install
	.venv/bin/statelab up $(TOPOLOGY)

test: install
	$(PY) -m pytest tests conformance --target $(TARGET) --report $(REPORT)

unit: install
	$(PY) -m pytest tests -m "not root"

clean:
	-.venv/bin/statelab clean
