#!/usr/bin/env bash
# Static checks of the operations files: the systemd unit, the man page, the
# Dockerfile and the compose example. Runs without systemd as PID 1 and
# without a Docker engine.
#
#   tests/check_ops.sh [BINARY]        BINARY defaults to build/pgmq-dispatcher
#                                      (built with `make` when missing)
#
# Needs systemd-analyze (systemd), groff (groff-base), mandoc and man (man-db).
# Prints one line per check with its figures; exits 1 if any check failed.
set -u
cd "$(dirname "$0")/.." || exit 1

UNIT=systemd/pgmq-dispatcher.service
MAN=docs/pgmq-dispatcher.8
DOCKERFILE=Dockerfile
COMPOSE=docs/docker-compose.example.yml
INSTALLED_BIN=/usr/local/bin/pgmq-dispatcher   # the path the unit names
MAX_EXPOSURE=15                                # tenths: fail above 1.5

failures=0
pass() { printf 'ok    %s\n' "$*"; }
fail() { printf 'FAIL  %s\n' "$*"; failures=$((failures + 1)); }
note() { printf 'note  %s\n' "$*"; }
# Indents captured output under the line that reports it.
show() { sed 's/^/      | /'; }

bin=${1:-build/pgmq-dispatcher}
if [ ! -x "$bin" ] && [ $# -eq 0 ]; then
	echo "building $bin (make) ..."
	make -s >/dev/null || { echo "make failed" >&2; exit 1; }
fi
[ -x "$bin" ] || { echo "no executable $bin" >&2; exit 1; }
bin=$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# --- systemd unit ---------------------------------------------------------
echo "== $UNIT (ExecStart/ExecStartPre -> $bin)"
unit=$tmp/pgmq-dispatcher.service   # the name must end in .service
sed "s#$INSTALLED_BIN#$bin#g" "$UNIT" >"$unit"
n=$(grep -cE "^Exec(Start|StartPre)=$bin( |$)" "$unit")
if [ "$n" -eq 2 ]; then
	pass "ExecStart and ExecStartPre rewritten ($n lines)"
else
	fail "expected 2 rewritten Exec lines naming $INSTALLED_BIN, found $n"
fi

# Unknown keys and unsupported values only warn (exit 0) on systemd 252, so
# any output at all counts as a failure.
out=$(systemd-analyze verify --man=no "$unit" 2>&1)
rc=$?
if [ $rc -eq 0 ] && [ -z "$out" ]; then
	pass "systemd-analyze verify: exit 0, no output"
else
	fail "systemd-analyze verify: exit $rc, $(printf '%s' "$out" | grep -c '') line(s) of output"
	printf '%s\n' "$out" | show
fi

out=$(systemd-analyze security --offline=true --threshold=$MAX_EXPOSURE "$unit" 2>&1)
rc=$?
score=$(printf '%s\n' "$out" | grep 'Overall exposure level')
if [ $rc -eq 0 ] && [ -n "$score" ]; then
	pass "systemd-analyze security (threshold $MAX_EXPOSURE/10): ${score#→ }"
else
	fail "systemd-analyze security --threshold=$MAX_EXPOSURE: exit $rc: ${score:-no score line}"
fi

# Static properties of the unit itself.
unit_has() { grep -qx "$1" "$UNIT"; }
# shellcheck disable=SC2016 # $MAINPID is systemd's, not the shell's
for line in Type=notify WatchdogSec=30s 'Documentation=man:pgmq-dispatcher(8)' \
	"ExecReload=/bin/sh -c 'kill -HUP \$MAINPID'" Restart=on-failure 'RestartPreventExitStatus=64 78' \
	"ExecStartPre=$INSTALLED_BIN --check-config"; do
	if unit_has "$line"; then pass "$line"; else fail "missing: $line"; fi
done
if grep -q "^ExecStart=$INSTALLED_BIN.* -v" "$UNIT"; then fail "ExecStart= runs with -v"; fi
af=$(sed -n 's/^RestrictAddressFamilies=//p' "$UNIT")
lacking=""
for fam in AF_UNIX AF_INET AF_INET6; do
	case " $af " in *" $fam "*) ;; *) lacking="$lacking $fam" ;; esac
done
if [ -z "$lacking" ]; then pass "RestrictAddressFamilies=$af"; else fail "RestrictAddressFamilies=$af lacks$lacking"; fi
if grep -q '^LoadCredential=runpod_api_key:' "$UNIT"; then
	pass "API key passed as the credential runpod_api_key"
else
	fail "no LoadCredential=runpod_api_key:"
fi
if grep -iE '^(Environment|SetCredential)=.*(API_KEY|PASSWORD|CONNINFO|DATABASE_URL)' "$UNIT" | grep -q .; then
	fail "a secret is set on an Environment=/SetCredential= line"
else
	pass "no secret on Environment=/SetCredential= lines"
fi
# TimeoutStopSec must leave room for the daemon's drain deadline.
stop_s=$(sed -n 's/^TimeoutStopSec=\([0-9]*\)s\{0,1\}$/\1/p' "$UNIT")
drain_ms=$(grep -o '"shutdown_timeout_ms", K_INT, OFF([a-z_]*), "[0-9]*"' src/config_keys.c | grep -o '"[0-9]*"$' | tr -d '"')
# Type=notify and WatchdogSec= need the daemon to send READY=1 and WATCHDOG=1.
if grep -q 'sdnotify_ready' src/main.c && grep -q 'sdnotify_watchdog_start' src/main.c; then
	pass "src/main.c sends READY=1 and starts the watchdog"
else
	note "src/main.c does not call sdnotify_ready()/sdnotify_watchdog_start() yet:" \
		"under this unit the daemon is never reported ready (docs/operations.md 1.3)"
fi
if [ -n "$stop_s" ] && [ -n "$drain_ms" ] && [ $((stop_s * 1000)) -gt "$drain_ms" ]; then
	pass "TimeoutStopSec=${stop_s}s > daemon.shutdown_timeout_ms default ${drain_ms} ms"
else
	fail "TimeoutStopSec='${stop_s}' s is not above daemon.shutdown_timeout_ms '${drain_ms}' ms"
fi

# --- make install / uninstall ----------------------------------------------
echo "== make install PREFIX=/usr, make uninstall (DESTDIR)"
inst=$tmp/inst
if make -s install DESTDIR="$inst" PREFIX=/usr UNITDIR=/lib/systemd/system >/dev/null 2>&1; then
	iunit=$inst/lib/systemd/system/pgmq-dispatcher.service
	n=$(grep -cE '^Exec(Start|StartPre)=/usr/bin/pgmq-dispatcher( |$)' "$iunit" 2>/dev/null)
	if [ "${n:-0}" -eq 2 ] && ! grep -q '^Exec.*/usr/local/' "$iunit"; then
		pass "installed unit names /usr/bin/pgmq-dispatcher ($n Exec lines)"
	else
		fail "installed unit does not name \$(BINDIR): $(grep '^Exec' "$iunit" 2>/dev/null | tr '\n' ' ')"
	fi
	make -s uninstall DESTDIR="$inst" PREFIX=/usr UNITDIR=/lib/systemd/system >/dev/null 2>&1
	left=$(find "$inst" -type f ! -path "*/etc/*" | wc -l)
	if [ "$left" -eq 0 ] && [ -f "$inst/etc/pgmq-dispatcher/pgmq-dispatcher.conf" ]; then
		pass "make uninstall removed binary, man page and unit; kept /etc"
	else
		fail "make uninstall left $left file(s) outside /etc or removed the configuration"
	fi
else
	fail "make install DESTDIR=... PREFIX=/usr failed"
fi

# --- man page -------------------------------------------------------------
echo "== $MAN"
out=$(groff -man -ww -z "$MAN" 2>&1)
if [ -z "$out" ]; then
	pass "groff -man -ww -z: no warnings"
else
	fail "groff -man -ww -z: $(printf '%s\n' "$out" | grep -c '') warning(s)"
	printf '%s\n' "$out" | show
fi
out=$(mandoc -Tlint "$MAN" 2>&1)
if [ -z "$out" ]; then
	pass "mandoc -Tlint: no messages"
elif ! printf '%s\n' "$out" | grep -qv ': STYLE: '; then
	pass "mandoc -Tlint: style messages only ($(printf '%s\n' "$out" | grep -c ''))"
	printf '%s\n' "$out" | show
else
	fail "mandoc -Tlint: $(printf '%s\n' "$out" | grep -vc ': STYLE: ') message(s) above STYLE"
	printf '%s\n' "$out" | show
fi
MANWIDTH=80 MANPAGER=cat PAGER=cat man -l "$MAN" >"$tmp/man.txt" 2>"$tmp/man.err"
lines=$(grep -c '' "$tmp/man.txt")
width=$(wc -L <"$tmp/man.txt")
if [ "$lines" -gt 100 ] && [ "$width" -le 80 ] && [ ! -s "$tmp/man.err" ]; then
	pass "man -l renders $lines lines, widest $width columns (MANWIDTH=80)"
else
	fail "man -l: $lines lines, widest $width columns, $(grep -c '' "$tmp/man.err") error line(s)"
	show <"$tmp/man.err"
fi
# Every long option of src/main.c and every key of src/config_keys.c's table.
# The man source spells --log-format as \-\-log\-format.
opts=$(sed -n 's/^[[:space:]]*{ "\([a-z-]*\)", [a-z_]*_argument,.*/\1/p' src/main.c)
missing="" count=0
for o in $opts; do
	count=$((count + 1))
	grep -qF -- "\\-\\-${o//-/\\-}" "$MAN" || missing="$missing --$o"
done
if [ -z "$missing" ]; then
	pass "man page names all $count long options of src/main.c"
else
	fail "man page lacks options:$missing"
fi
keys=$(sed -n 's/^[[:space:]]*{ "\([a-z]*\)", "\([a-z0-9_]*\)", K_.*/\1.\2/p' src/config_keys.c)
missing="" count=0
for k in $keys; do
	count=$((count + 1))
	section=${k%%.*} name=${k#*.}
	env=$(echo "PGMQD_${section}_${name}" | tr '[:lower:]' '[:upper:]')
	# The key's own entry under its [section] heading, and its variable.
	sed -n "/^\\.SS \"\\[$section\\]\"/,/^\\.S[SH] /p" "$MAN" | grep -qx ".B $name" &&
		grep -q "$env" "$MAN" || missing="$missing $k"
done
if [ -z "$missing" ]; then
	pass "man page describes all $count keys of src/config_keys.c (entry + PGMQD_ name)"
else
	fail "man page lacks keys:$missing"
fi
if "$bin" --help 2>&1 | grep -q -- '--health-check'; then
	pass "$(basename "$bin") --help lists --health-check"
else
	note "$(basename "$bin") has no --health-check yet: the image's HEALTHCHECK reports unhealthy until it lands"
fi

# --- Dockerfile -----------------------------------------------------------
echo "== $DOCKERFILE"
n=$(grep -cE '^FROM debian:bookworm-slim( AS [a-z]+)?$' "$DOCKERFILE")
total=$(grep -c '^FROM ' "$DOCKERFILE")
if [ "$n" -eq 2 ] && [ "$total" -eq 2 ]; then
	pass "two stages, both FROM debian:bookworm-slim"
else
	fail "stages: $total FROM lines, $n of them debian:bookworm-slim"
fi
# The runtime stage: from the last FROM to the end, comments dropped.
runtime=$(awk '/^FROM /{buf=""} {buf=buf $0 "\n"} END{printf "%s", buf}' "$DOCKERFILE" | grep -v '^[[:space:]]*#')
# runtime_has PATTERN MESSAGE: a fixed-string line match in the runtime stage.
runtime_has() {
	if printf '%s\n' "$runtime" | grep -qF -- "$1"; then pass "$2"; else fail "runtime stage lacks: $1"; fi
}
runtime_has 'USER 10001:10001' "runtime runs as USER 10001:10001"
runtime_has 'ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/pgmq-dispatcher"]' "ENTRYPOINT: tini, exec form"
runtime_has 'CMD ["/usr/local/bin/pgmq-dispatcher", "--health-check"]' "HEALTHCHECK CMD: pgmq-dispatcher --health-check, exec form"
runtime_has '--no-install-recommends' "runtime apt-get uses --no-install-recommends"
runtime_has 'rm -rf /var/lib/apt/lists/*' "runtime stage removes the apt lists"
if printf '%s\n' "$runtime" | grep -qw curl; then
	fail "the runtime stage mentions curl (the tool): $(printf '%s\n' "$runtime" | grep -w curl | head -1)"
else
	pass "no curl in the runtime stage (libcurl4 only)"
fi
secret_env=$(grep -iE '^(ENV|ARG)[[:space:]].*(KEY|PASSWORD|SECRET|TOKEN|DATABASE_URL|CONNINFO)' "$DOCKERFILE")
if [ -z "$secret_env" ]; then pass "no secrets in ENV/ARG"; else fail "secret-looking ENV/ARG: $secret_env"; fi
if grep -qx '\*' .dockerignore 2>/dev/null; then
	pass ".dockerignore is an allow-list ($(grep -c '^!' .dockerignore) entries)"
else
	fail ".dockerignore missing or not an allow-list"
fi

# --- compose example ------------------------------------------------------
echo "== $COMPOSE"
# compose_has REGEX MESSAGE: an extended-regex match in the compose file.
compose_has() {
	if grep -qE -- "$1" "$COMPOSE"; then pass "$2"; else fail "compose example lacks /$1/"; fi
}
compose_has '^    read_only: true' "read_only: true"
compose_has '^    cap_drop: \[ALL\]' "cap_drop: [ALL]"
compose_has '^      RUNPOD_API_KEY_FILE: /run/secrets/runpod_api_key$' "RUNPOD_API_KEY_FILE from a compose secret"
compose_has '^      DATABASE_URL(_FILE)?: ' "DATABASE_URL_FILE or DATABASE_URL"
compose_has '^  runpod_api_key:$' "top-level secret runpod_api_key"
if grep -qE '^[[:space:]]+(RUNPOD_API_KEY|PGMQD_RUNPOD_API_KEY):' "$COMPOSE"; then
	fail "the compose example sets the API key itself"
else
	pass "no plain API key in the compose example"
fi

echo
if [ "$failures" -eq 0 ]; then
	echo "check_ops: all checks passed"
else
	echo "check_ops: $failures check(s) failed"
	exit 1
fi
