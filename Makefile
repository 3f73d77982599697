# Two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: run test check lint types bench torture system-deps bench-deps torture-deps clean

# The Debian packages a recipe put in $$missing: installed with apt-get as root, else named (what needs them skips).
APT_INSTALL_MISSING = if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else \
	    echo "note: missing$$missing (what needs them is skipped; install them with apt-get)"; \
	  fi; \
	fi

$(BIN)/spoold: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.test-deps: pyproject.toml $(BIN)/spoold
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

## Run the daemon on its embedded default (spool ./spool): drop files into ./spool/incoming/inbox/
run: $(BIN)/spoold
	$(BIN)/spoold run

## Install what the tests need (openssh-server, ffmpeg, unzip, debootstrap, systemd-container via apt-get when
## missing) and pass them.
test: system-deps $(VENV)/.test-deps
	$(BIN)/ruff check src tests bench torture
	$(BIN)/mypy
	$(BIN)/pytest

check: test

system-deps:
	@missing=""; \
	command -v sshd >/dev/null 2>&1 || [ -x /usr/sbin/sshd ] || missing="$$missing openssh-server"; \
	command -v ffmpeg >/dev/null 2>&1 || missing="$$missing ffmpeg"; \
	command -v ffprobe >/dev/null 2>&1 || missing="$$missing ffmpeg"; \
	command -v unzip >/dev/null 2>&1 || missing="$$missing unzip"; \
	command -v faketime >/dev/null 2>&1 || missing="$$missing faketime"; \
	command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || missing="$$missing debootstrap"; \
	command -v systemd-nspawn >/dev/null 2>&1 || missing="$$missing systemd-container"; \
	$(APT_INSTALL_MISSING)

## Benchmarks: ratios against the reference tools, measured in the same run.
bench: system-deps bench-deps $(VENV)/.test-deps
	$(BIN)/python -m bench

# What only the benchmarks need: xxhsum's xxh128sum, the fastest digest tool a far host can offer the SFTP upload.
bench-deps:
	@missing=""; \
	command -v xxh128sum >/dev/null 2>&1 || missing="$$missing xxhash"; \
	$(APT_INSTALL_MISSING)

## Fault cases (minutes): kill -9, power cuts, full disks, lost events, cut links, clock jumps; counts what is lost.
torture: system-deps torture-deps $(VENV)/.test-deps
	$(BIN)/python -m torture

# What only the torture cases need (not `make test`): tc for the network case.
torture-deps:
	@missing=""; \
	command -v tc >/dev/null 2>&1 || [ -x /usr/sbin/tc ] || missing="$$missing iproute2"; \
	$(APT_INSTALL_MISSING)

clean:
	rm -rf $(VENV) spool .pytest_cache .mypy_cache .ruff_cache
