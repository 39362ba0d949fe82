# pgmq-dispatcher — one plain Makefile.
# Targets: all (default), deps, test, unit, integration, run, install, clean, fuzz, lint.

PROG      := pgmq-dispatcher
VERSION   := 0.1.0
PREFIX    ?= /usr/local
DESTDIR   ?=
SYSCONFDIR ?= /etc
BUILD     ?= build
PYTHON    ?= /usr/bin/python3

CC        ?= cc
PKGS      := libpq libcurl libcjson inih
# libev ships no pkg-config file on Debian 12; fall back to plain -lev.
EV_CFLAGS := $(shell pkg-config --cflags libev 2>/dev/null)
EV_LIBS   := $(shell pkg-config --libs libev 2>/dev/null || echo -lev)

WARN      := -Wall -Wextra -Werror -Wshadow -Wstrict-prototypes -Wmissing-prototypes \
             -Wformat=2 -Wno-format-nonliteral -Wvla -Wpointer-arith
CFLAGS    ?= -O2 -g
ALL_CFLAGS = -std=c11 -D_GNU_SOURCE $(WARN) $(CFLAGS) -Iinclude \
             -DPGMQD_VERSION='"$(VERSION)"' \
             $(shell pkg-config --cflags $(PKGS)) $(EV_CFLAGS)
LDLIBS    := $(shell pkg-config --libs $(PKGS)) $(EV_LIBS) -lm

ifeq ($(SANITIZE),1)
ALL_CFLAGS += -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all
LDFLAGS    += -fsanitize=address,undefined
BUILD      := build-san
endif

MODULES   := main config log pg pgmq http runpod dispatcher
OBJS      := $(MODULES:%=$(BUILD)/%.o)
LIB_OBJS  := $(filter-out $(BUILD)/main.o,$(OBJS))

UNIT_TESTS := test_runpod test_config test_log test_pgmq
UNIT_BINS  := $(UNIT_TESTS:%=$(BUILD)/tests/%)

.PHONY: all deps test unit integration run install clean fuzz lint

all: $(BUILD)/$(PROG)

$(BUILD)/$(PROG): $(OBJS)
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS)

$(BUILD)/%.o: src/%.c $(wildcard include/*.h) | $(BUILD)
	$(CC) $(ALL_CFLAGS) -c -o $@ $<

$(BUILD) $(BUILD)/tests:
	mkdir -p $@

$(BUILD)/tests/%: tests/unit/%.c $(LIB_OBJS) | $(BUILD)/tests
	$(CC) $(ALL_CFLAGS) -Wno-unused-parameter $(LDFLAGS) -o $@ $< $(LIB_OBJS) $(LDLIBS) $$(pkg-config --libs cmocka)

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

install: $(BUILD)/$(PROG)
	install -D -m 0755 $(BUILD)/$(PROG) $(DESTDIR)$(PREFIX)/bin/$(PROG)
	install -D -m 0644 docs/$(PROG).8 $(DESTDIR)$(PREFIX)/share/man/man8/$(PROG).8
	install -D -m 0644 systemd/$(PROG).service $(DESTDIR)$(PREFIX)/lib/systemd/system/$(PROG).service
	install -d -m 0755 $(DESTDIR)$(SYSCONFDIR)/$(PROG)
	test -e $(DESTDIR)$(SYSCONFDIR)/$(PROG)/$(PROG).conf || \
	  install -m 0640 config/$(PROG).conf $(DESTDIR)$(SYSCONFDIR)/$(PROG)/$(PROG).conf

clean:
	rm -rf build build-san
