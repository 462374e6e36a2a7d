# Debian's own interpreter and python3-* packages: the versions the .deb will run with.
PYTHON ?= /usr/bin/python3
PYTEST ?= $(PYTHON) -m pytest
DEMO_ROOT ?= $(CURDIR)/demo-root

.PHONY: deps test unit integration lint sandbox demo demo-clean bench soak deb deb-clean

# The Debian packages `make sandbox` and `make test` need, installed by tools/install-deps: once
# (nothing is run when they are there: dpkg-query, no apt, no network), as root; as another user it names
# what is missing and stops. `sudo make deps` installs what both need. The lists are in the script.
deps:  ## install what `make sandbox` and `make test` need (Debian packages, apt-get, as root)
	tools/install-deps test

test:  ## every test: unit, integration (real sshd in namespaces, the real daemon loop), e2e (the .deb on booted VPSs)
	tools/install-deps test
	$(PYTEST) -q tests

unit:
	$(PYTEST) -q tests/unit

integration:
	$(PYTEST) -q tests/integration

# ruff and mypy pinned from PyPI (tools/lint-requirements.txt) in a venv that tools/install-deps makes once,
# without root: Debian 12 has no ruff package. mypy's files (agent, tests, the Ansible plugins) are in setup.cfg.
LINT_VENV ?= $(CURDIR)/build/lint-venv

lint:  ## ruff and mypy, as CI runs them
	LINT_VENV=$(LINT_VENV) tools/install-deps lint
	$(LINT_VENV)/bin/ruff check agent tests bench packaging/ansible/plugins
	$(LINT_VENV)/bin/mypy

# the packages first, then the .deb (a sub-make, so that `make -j sandbox` cannot build before installing)
sandbox:  ## boot a Debian 12 VPS with the .deb installed, show status, a heal and a real ssh login
	tools/install-deps sandbox
	$(MAKE) --no-print-directory deb
	tests/e2e/sandbox-demo

# The README's first command: root, no network, ~2 s; installs nothing (it uses what `make deps` installs).
demo:  ## a fake root with Debian's stock sshd_config, the agent guarding it, its status and a healed tamper
	./bench/demo.sh $(DEMO_ROOT)

demo-clean:
	rm -rf $(DEMO_ROOT)

bench:  ## every benchmark of issue 9 (~12 min; QUICK=1: a ~3 min smoke run), as root; writes bench/RESULTS.md
	$(PYTHON) bench/run.py --results bench/RESULTS.md $(if $(QUICK),--quick) $(if $(NOTE),--note "$(NOTE)")

SOAK_MINUTES ?= 60

soak:  ## the real daemon for an hour (SOAK_MINUTES=N) under random tampers, as root; the Soak section of bench/RESULTS.md
	SOAK_MINUTES=$(SOAK_MINUTES) $(PYTHON) bench/soak.py --results bench/RESULTS.md $(if $(SEED),--seed $(SEED))

# The Debian package. `make deb` copies the tracked files (git ls-files: untracked junk and caches never
# ship; uncommitted edits to tracked files do) to build/vps-agent-<version>/, with packaging/debian/
# as debian/, builds build/vps-agent_<version>_all.deb there with dpkg-buildpackage, and fails on any
# lintian error or warning. `make deb VERSION=0.0.9` builds the same tree as another version, e.g. the
# "previous" package the upgrade tests need: in the build copy only, a changelog entry for that version
# is added and agent.__version__ set to it (so `vps-agent --version` tells the packages apart);
# packaging/debian/changelog and agent/__init__.py are never touched. VERSION counts only on the
# command line, so a VERSION variable in the environment cannot change what gets built.
# Without dpkg-dev (dpkg-parsechangelog, dpkg-buildpackage) or lintian it says which package to install.
DEB_CHANGELOG_VERSION = $(shell command -v dpkg-parsechangelog >/dev/null && \
  dpkg-parsechangelog -l packaging/debian/changelog -S Version)
DEB_VERSION = $(if $(filter command line,$(origin VERSION)),$(VERSION),$(DEB_CHANGELOG_VERSION))
DEB_TREE = build/vps-agent-$(DEB_VERSION)

deb:
	@missing=; for need in dpkg-parsechangelog:dpkg-dev dpkg-buildpackage:dpkg-dev lintian:lintian; do \
	  command -v $${need%%:*} >/dev/null || case " $$missing " in *" $${need#*:} "*) ;; *) missing="$$missing $${need#*:}";; esac; \
	done; [ -z "$$missing" ] || { \
	  echo "make deb needs$$missing (apt-get install$$missing, or \`sudo make deps\` for all that make test needs)" >&2; exit 2; }
	@printf '%s\n' '$(DEB_VERSION)' | grep -Eqx '[0-9][A-Za-z0-9.+~]*' || { \
	  echo "make deb: '$(DEB_VERSION)' is not a native package version (digits first, then A-Za-z0-9.+~)" >&2; exit 2; }
	rm -rf $(DEB_TREE) $(DEB_TREE).files build/vps-agent_$(DEB_VERSION)_*
	mkdir -p $(DEB_TREE)
	git ls-files -z > $(DEB_TREE).files
	tar --null --ignore-failed-read -T $(DEB_TREE).files -cf - | tar -xf - -C $(DEB_TREE)
	cp -R $(DEB_TREE)/packaging/debian $(DEB_TREE)/debian
	set -e; if [ "$(DEB_VERSION)" != "$(DEB_CHANGELOG_VERSION)" ]; then \
	  cd $(DEB_TREE)/debian; \
	  maintainer=$$(dpkg-parsechangelog -l changelog -S Maintainer); test -n "$$maintainer"; \
	  { printf 'vps-agent (%s) unstable; urgency=medium\n\n' "$(DEB_VERSION)"; \
	    printf '  * Built with make deb VERSION=%s from the %s tree.\n\n' "$(DEB_VERSION)" "$(DEB_CHANGELOG_VERSION)"; \
	    printf ' -- %s  %s\n\n' "$$maintainer" "$$(date -R)"; \
	    cat changelog; } > changelog.new; \
	  mv changelog.new changelog; \
	  sed -i 's/^__version__ = .*/__version__ = "$(DEB_VERSION)"/' ../agent/__init__.py; \
	  grep -qx '__version__ = "$(DEB_VERSION)"' ../agent/__init__.py; \
	fi
	cd $(DEB_TREE) && dpkg-buildpackage -us -uc -b
	lintian --fail-on error,warning --display-info \
	  build/vps-agent_$(DEB_VERSION)_$$(dpkg --print-architecture).changes
	@ls -l build/vps-agent_$(DEB_VERSION)_all.deb

deb-clean:
	rm -rf build/vps-agent-* build/vps-agent_*
