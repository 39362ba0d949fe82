#!/bin/sh
# Prints the path of a Debian 12 root (debootstrap) for the systemd tests,
# built once per machine and package list and kept in $CACHE (default
# /var/cache/pgmq-dispatcher-tests). The key is a hash of this script, so a
# changed package list builds a new root. Callers copy it before booting it.
#
#   tests/system/rootfs.sh            -> /var/cache/pgmq-dispatcher-tests/root-<key>
#
# The packages: systemd as PID 1, PostgreSQL 15, python3 (the RunPod
# emulator) and the daemon's shared libraries, so that the .deb installs
# inside the booted root without any network (it boots with
# --private-network).
set -eu
CACHE=${PGMQD_TEST_CACHE:-/var/cache/pgmq-dispatcher-tests}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
INCLUDE=systemd,systemd-sysv,dbus,postgresql-15,python3,ca-certificates,libev4,libpq5,libcurl4,libcjson1,libinih1,libsystemd0,libmicrohttpd12

key=$(sha256sum "$0" | cut -c1-12)
root=$CACHE/root-$key
if [ -e "$root/.complete" ]; then
	echo "$root"
	exit 0
fi
mkdir -p "$CACHE"
rm -rf "$root" "$root.tmp"
echo "rootfs: debootstrap bookworm into $root (cached for later runs)" >&2
debootstrap --variant=minbase --include=$INCLUDE bookworm "$root.tmp" "$MIRROR" >"$CACHE/debootstrap-$key.log" 2>&1 ||
	{ tail -n 30 "$CACHE/debootstrap-$key.log" >&2; exit 1; }
chroot "$root.tmp" apt-get clean
rm -rf "$root.tmp/var/lib/apt/lists/"*
# Older roots of another package list are stale.
for old in "$CACHE"/root-*; do
	[ -d "$old" ] && [ "$old" != "$root.tmp" ] && rm -rf "$old"
done
touch "$root.tmp/.complete"
mv "$root.tmp" "$root"
echo "$root"
