#!/bin/sh
# Installs every build and test dependency of pgmq-dispatcher from Debian's
# packages. Idempotent: does nothing when all are present.
set -eu

# clang-tidy, clang-format and cppcheck are the tools of make lint.
# postgresql-15 also brings pgbench; nginx-light is the benchmark's HTTP sink (make bench), run
# with a private config; time (GNU time) measures a process's peak RSS there. On a host with systemd, Debian starts its stock nginx site on port 80
# when the package is installed; `systemctl disable --now nginx` if that is unwanted.

DEFAULT_PACKAGES="build-essential pkg-config
libev-dev libpq-dev libcurl4-openssl-dev libcjson-dev libinih-dev libsystemd-dev
libmicrohttpd-dev libcmocka-dev
postgresql-15 postgresql-client-15 pgbouncer openssl
nginx-light time
python3 python3-pytest python3-psycopg2
valgrind clang clang-tidy clang-format cppcheck systemd groff-base man-db mandoc"

# Packages named as arguments are installed instead of the list above
# (tests/system/deps.sh passes its own).
PACKAGES=${*:-$DEFAULT_PACKAGES}

missing=""
for p in $PACKAGES; do
	if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
		missing="$missing $p"
	fi
done
[ -z "$missing" ] && exit 0

echo "deps: installing:$missing"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# shellcheck disable=SC2086
$SUDO apt-get install -y -qq --no-install-recommends $missing
