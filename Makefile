# Debian's own interpreter and python3-* packages: the versions the .deb will run with.
PYTHON ?= /usr/bin/python3
PYTEST ?= $(PYTHON) -m pytest
DEMO_ROOT ?= $(CURDIR)/demo-root

.PHONY: test unit integration lint demo demo-clean bench

test:  ## every test: unit, integration (real sshd in namespaces), timeline (the real daemon loop)
	$(PYTEST) -q tests

unit:
	$(PYTEST) -q tests/unit

integration:
	$(PYTEST) -q tests/integration

lint:
	ruff check agent tests bench
	mypy

demo:  ## a fake root with Debian's stock sshd_config, the agent guarding it, its status and a healed tamper
	./bench/demo.sh $(DEMO_ROOT)

demo-clean:
	rm -rf $(DEMO_ROOT)

bench:  ## drift-to-healed latency and RSS through the real loop; writes bench/RESULTS.md
	$(PYTHON) bench/heal_latency.py --runs 200 --results bench/RESULTS.md
