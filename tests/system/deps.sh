#!/bin/sh
# Installs what `make test-system` needs beyond tests/deps.sh, from Debian's
# packages: debootstrap (the Debian 12 root and the Docker base image),
# systemd-container (systemd-nspawn), docker.io (dockerd), debhelper and
# devscripts (make deb), lintian. Idempotent; root only.
set -eu
sh "$(dirname "$0")/../deps.sh"

PACKAGES="debootstrap systemd-container docker.io debhelper devscripts fakeroot lintian
util-linux"

missing=""
for p in $PACKAGES; do
	if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
		missing="$missing $p"
	fi
done
[ -z "$missing" ] && exit 0
echo "system deps: installing:$missing"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $missing
