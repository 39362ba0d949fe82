#!/bin/sh
# Installs what `make test-system` needs beyond tests/deps.sh, from Debian's
# packages: debootstrap (the Debian 12 root and the Docker base image),
# systemd-container (systemd-nspawn), docker.io (dockerd), debhelper and
# devscripts (make deb), lintian. Idempotent; root only.
set -eu
sh "$(dirname "$0")/../deps.sh"

PACKAGES="debootstrap systemd-container docker.io debhelper devscripts fakeroot lintian
util-linux"

# shellcheck disable=SC2086
exec sh "$(dirname "$0")/../deps.sh" $PACKAGES
