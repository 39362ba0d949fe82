#!/bin/sh
# Prints the path of a Debian 12 root (debootstrap) for the systemd tests,
# built once per machine and package list and kept in $CACHE (default
# /var/cache/pgmq-dispatcher-tests). The key is a hash of the suite and the
# package list, so a changed list builds a new root (and drops the old one).
# Callers copy it before booting it. Concurrent callers wait on a lock.
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

SUITE=bookworm
key=$(printf '%s %s %s\n' "$SUITE" "$INCLUDE" "$MIRROR" | sha256sum | cut -c1-12)
root=$CACHE/root-$key
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9
if [ -e "$root/.complete" ]; then
	echo "$root"
	exit 0
fi
rm -rf "$root" "$root.tmp"
echo "rootfs: debootstrap bookworm into $root (cached for later runs)" >&2
debootstrap --variant=minbase --include=$INCLUDE $SUITE "$root.tmp" "$MIRROR" >"$CACHE/debootstrap-$key.log" 2>&1 ||
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
