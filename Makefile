# pgmq-dispatcher — one plain Makefile.
# Targets: all (default), deps, test, unit, integration, run, install, uninstall, deb,
# test-system, clean, fuzz, lint, format, bench.

PROG      := pgmq-dispatcher
VERSION   := 0.1.0
PREFIX    ?= /usr/local
DESTDIR   ?=
SYSCONFDIR ?= /etc
BINDIR    ?= $(PREFIX)/bin
MANDIR    ?= $(PREFIX)/share/man
# systemd looks in /usr/local/lib/systemd/system and /lib/systemd/system (the
# Debian package passes UNITDIR=/lib/systemd/system).
UNITDIR   ?= $(PREFIX)/lib/systemd/system
BUILD     ?= build
PYTHON    ?= /usr/bin/python3
SHELL     := /bin/bash

CC        ?= cc
PKGS      := libpq libcurl libcjson inih libsystemd libmicrohttpd
# libev ships no pkg-config file on Debian 12; fall back to plain -lev.
EV_CFLAGS := $(shell pkg-config --cflags libev 2>/dev/null)
EV_LIBS   := $(shell pkg-config --libs libev 2>/dev/null || echo -lev)

WARN      := -Wall -Wextra -Werror -Wshadow -Wstrict-prototypes -Wmissing-prototypes \
             -Wformat=2 -Wno-format-nonliteral -Wvla -Wpointer-arith
CFLAGS    ?= -O2 -g
ALL_CFLAGS = -std=c11 -D_GNU_SOURCE $(WARN) $(CPPFLAGS) $(CFLAGS) -Iinclude \
             -DPGMQD_VERSION='"$(VERSION)"' \
             $(shell pkg-config --cflags $(PKGS)) $(EV_CFLAGS)
LDLIBS    := $(shell pkg-config --libs $(PKGS)) $(EV_LIBS) -lm

ifeq ($(SANITIZE),1)
ALL_CFLAGS += -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all
LDFLAGS    += -fsanitize=address,undefined
BUILD      := build-san
endif

MODULES   := main commands budget config config_keys config_source config_check log log_sink pg pg_share pgmq \
             http jsonscan \
             runpod dispatcher shutdown reload batch post circuit control route ctl wakeup overflow dryrun backoff \
             ratelimit endpoint sdnotify metrics metrics_route metrics_fleet admin admin_probe listenaddr tracker \
             tracker_ops tracker_reply tracker_health jobtable ledger ledger_tick ledger_sql ledger_view ledger_cli \
             migrate dispatches
OBJS      := $(MODULES:%=$(BUILD)/%.o)
LIB_OBJS  := $(filter-out $(BUILD)/main.o,$(OBJS))

UNIT_TESTS := test_budget test_runpod test_config test_config_check test_log test_pgmq test_metrics test_admin \
              test_sdnotify test_tracker test_jobtable test_decisions test_reload test_routes test_ledger \
              test_ledger_view test_pg_share
UNIT_BINS  := $(UNIT_TESTS:%=$(BUILD)/tests/%)

.PHONY: all deps test unit integration soak valgrind run install uninstall deb test-system clean \
        fuzz lint lint-tidy lint-cppcheck lint-format format bench

all: $(BUILD)/$(PROG)

$(BUILD)/$(PROG): $(OBJS)
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS)

# -MMD -MP: the compiler writes each object's header dependencies to a .d file beside it.
$(BUILD)/%.o: src/%.c | $(BUILD)
	$(CC) $(ALL_CFLAGS) -MMD -MP -c -o $@ $<

$(BUILD) $(BUILD)/tests:
	mkdir -p $@

$(BUILD)/tests/%: tests/unit/%.c $(LIB_OBJS) | $(BUILD)/tests
	$(CC) $(ALL_CFLAGS) -Wno-unused-parameter -MMD -MP $(LDFLAGS) -o $@ $< $(LIB_OBJS) $(LDLIBS) $$(pkg-config --libs cmocka)

-include $(OBJS:.o=.d) $(UNIT_BINS:=.d)

# Allocation-failure injection: malloc, calloc, realloc and strdup of our own
# objects go through the test's wrappers.
$(BUILD)/tests/test_reload: tests/unit/test_reload.c $(LIB_OBJS) | $(BUILD)/tests
	$(CC) $(ALL_CFLAGS) -Wno-unused-parameter -MMD -MP $(LDFLAGS) \
	  -Wl,--wrap=malloc,--wrap=calloc,--wrap=realloc,--wrap=strdup \
	  -o $@ $< $(LIB_OBJS) $(LDLIBS) $$(pkg-config --libs cmocka)

# Installs every build and test dependency from Debian's packages (idempotent).
deps:
	@sh tests/deps.sh

unit: $(UNIT_BINS)
	@set -e; for t in $(UNIT_BINS); do echo "== $$t"; $$t; done

integration: $(BUILD)/$(PROG)
	DISPATCHER_BIN=$(abspath $(BUILD)/$(PROG)) $(PYTHON) -m pytest -q tests/integration $(PYTEST_ARGS)

test: deps
	$(MAKE) unit
	$(MAKE) integration

run: deps $(BUILD)/$(PROG)
	DISPATCHER_BIN=$(abspath $(BUILD)/$(PROG)) $(PYTHON) tests/demo.py

# The unit names the binary by its installed path: the checked-in file says
# /usr/local/bin, rewritten here to $(BINDIR). The configuration file is never
# overwritten (an edited one stays as it is).
install: $(BUILD)/$(PROG)
	install -D -m 0755 $(BUILD)/$(PROG) $(DESTDIR)$(BINDIR)/$(PROG)
	install -D -m 0644 docs/$(PROG).8 $(DESTDIR)$(MANDIR)/man8/$(PROG).8
	install -d -m 0755 $(DESTDIR)$(UNITDIR)
	sed 's#/usr/local/bin/#$(BINDIR)/#g' systemd/$(PROG).service > $(DESTDIR)$(UNITDIR)/$(PROG).service
	chmod 0644 $(DESTDIR)$(UNITDIR)/$(PROG).service
	install -d -m 0755 $(DESTDIR)$(SYSCONFDIR)/$(PROG)
	test -e $(DESTDIR)$(SYSCONFDIR)/$(PROG)/$(PROG).conf || \
	  install -m 0644 config/$(PROG).conf $(DESTDIR)$(SYSCONFDIR)/$(PROG)/$(PROG).conf

# Removes what install wrote except the configuration directory (it may hold
# an edited file and the API key credential): remove that by hand.
uninstall:
	rm -f $(DESTDIR)$(BINDIR)/$(PROG) $(DESTDIR)$(MANDIR)/man8/$(PROG).8 \
	  $(DESTDIR)$(UNITDIR)/$(PROG).service

# The Debian package, built from a copy of the tree in build-deb/ (so that
# debhelper's clean does not touch build/): build-deb/$(PROG)_$(VERSION)_amd64.deb.
# Needs debhelper and the -dev packages (make deps); LINTIAN=1 also lints it.
DEB_ARCH := $(shell dpkg --print-architecture 2>/dev/null || echo amd64)
DEB      := build-deb/$(PROG)_$(VERSION)_$(DEB_ARCH).deb
deb:
	@v=$$(dpkg-parsechangelog -l debian/changelog -S Version); \
	  [ "$$v" = "$(VERSION)" ] || { echo "debian/changelog says $$v, Makefile VERSION $(VERSION)"; exit 1; }
	rm -rf build-deb && mkdir -p build-deb/src
	tar -c Makefile include src docs config systemd debian | tar -C build-deb/src -x
	cd build-deb/src && dpkg-buildpackage -b -us -uc -j$$(nproc) > ../build.log 2>&1 || \
	  { tail -n 40 ../build.log; exit 1; }
	@ls -l $(DEB)
	@if [ "$(LINTIAN)" = 1 ]; then lintian --fail-on error $(DEB); fi

# The package under a booted Debian 12 (systemd-nspawn) and the image under a
# real Docker engine: tests/system/README.md. Root only; installs its tools.
test-system:
	@sh tests/system/deps.sh
	$(MAKE) deb
	$(PYTHON) -m pytest -q -p no:cacheprovider tests/system $(PYTEST_ARGS)

soak: $(BUILD)/$(PROG)
	DISPATCHER_BIN=$(abspath $(BUILD)/$(PROG)) $(PYTHON) -m pytest -q -s -m soak tests/integration/test_soak.py

# An integration run of 1,000 messages with the daemon under valgrind memcheck.
valgrind: $(BUILD)/$(PROG)
	DISPATCHER_BIN=$(abspath $(BUILD)/$(PROG)) $(PYTHON) -m pytest -q -s -m valgrind tests/integration/test_valgrind.py \
	  tests/integration/test_ledger_jobs.py

# Benchmark harness (issue 5): an -O2 build of its own, then tests/bench/bench.py, which starts
# PostgreSQL, nginx and the RunPod emulator, writes docs/performance.md and prints it.
# BENCH_QUICK=1 for a smoke-sized run; BENCH_ARGS="--output FILE --only 1,4" for parts.
BENCH_BUILD := build-bench
bench: deps
	$(MAKE) --no-print-directory BUILD=$(BENCH_BUILD) SANITIZE= CFLAGS='-O2 -g' $(BENCH_BUILD)/$(PROG)
	DISPATCHER_BIN=$(abspath $(BENCH_BUILD)/$(PROG)) $(PYTHON) tests/bench/bench.py $(BENCH_ARGS)

# libFuzzer targets (clang), each run for FUZZ_SECONDS from its checked-in corpus.
FUZZ_SECONDS ?= 10
FUZZ_TARGETS := config run_reply status_reply
FUZZ_CFLAGS  := -std=c11 -D_GNU_SOURCE -g -O1 -Iinclude -DPGMQD_VERSION='"$(VERSION)"' \
                -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
                $(shell pkg-config --cflags $(PKGS))
CONFIG_SRCS  := src/config.c src/config_keys.c src/config_source.c src/config_check.c \
                src/listenaddr.c src/log.c src/log_sink.c
build-fuzz/fuzz_config: tests/fuzz/fuzz_config.c $(CONFIG_SRCS) $(wildcard include/*.h)
	mkdir -p build-fuzz
	clang $(FUZZ_CFLAGS) -o $@ tests/fuzz/fuzz_config.c $(CONFIG_SRCS) $(shell pkg-config --libs libpq inih) $(EV_LIBS)
build-fuzz/fuzz_%: tests/fuzz/fuzz_%.c src/runpod.c src/jsonscan.c $(wildcard include/*.h)
	mkdir -p build-fuzz
	clang $(FUZZ_CFLAGS) -o $@ $< src/runpod.c src/jsonscan.c $(shell pkg-config --libs libcjson libcurl)

fuzz: $(FUZZ_TARGETS:%=build-fuzz/fuzz_%)
	@set -e; for t in $(FUZZ_TARGETS); do \
	  mkdir -p build-fuzz/corpus-$$t; \
	  echo "== fuzz_$$t for $(FUZZ_SECONDS) s"; \
	  if ! build-fuzz/fuzz_$$t -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 -max_len=4096 \
	       build-fuzz/corpus-$$t tests/fuzz/corpus/$$t > build-fuzz/fuzz_$$t.log 2>&1; then \
	    tail -n 60 build-fuzz/fuzz_$$t.log; exit 1; \
	  fi; \
	  grep -E "^Done|stat::number_of_executed_units" build-fuzz/fuzz_$$t.log; \
	done

# Static checks: clang-tidy (checks and why in .clang-tidy), cppcheck, and clang-format in
# check mode (.clang-format). Any finding of any tool fails the target; each tool reports all
# of its findings first. `make format` rewrites the files in place.
LINT_SRCS   := $(wildcard src/*.c)
FORMAT_SRCS := $(wildcard src/*.c src/*.h include/*.h tests/unit/*.c tests/fuzz/*.c)
# The build's flags, with library headers as -isystem so that only our own code is reported.
TIDY_FLAGS  := -std=c11 -D_GNU_SOURCE -Iinclude -DPGMQD_VERSION='"$(VERSION)"' \
               $(patsubst -I%,-isystem%,$(shell pkg-config --cflags $(PKGS))) $(EV_CFLAGS)

# The quick checks first.
lint: lint-format lint-cppcheck lint-tidy

lint-tidy:
	@rc=0; $(foreach f,$(LINT_SRCS),clang-tidy --quiet \
	  $(f) -- $(TIDY_FLAGS) 2>&1 | { grep -v ' warnings\? generated\.$$' || true; }; \
	  [ $${PIPESTATUS[0]} -eq 0 ] || rc=1;) \
	  if [ $$rc -ne 0 ]; then echo "lint: clang-tidy found problems"; exit 1; fi; echo "lint: clang-tidy clean"

lint-cppcheck:
	@cppcheck --quiet --error-exitcode=1 --enable=warning,performance,portability --std=c11 \
	  --inline-suppr -D_GNU_SOURCE -DPGMQD_VERSION='"$(VERSION)"' -Iinclude --template=gcc \
	  src tests/unit tests/fuzz || { echo "lint: cppcheck found problems"; exit 1; }
	@echo "lint: cppcheck clean"

lint-format:
	@clang-format --dry-run --Werror $(FORMAT_SRCS) || \
	  { echo "lint: clang-format: run 'make format'"; exit 1; }
	@echo "lint: clang-format clean"

format:
	clang-format -i $(FORMAT_SRCS)

clean:
	rm -rf build build-san build-fuzz build-bench build-deb
