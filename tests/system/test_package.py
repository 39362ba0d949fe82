"""The Debian package itself: lintian reports no error, and the package
holds what docs/operations.md says it holds."""

from __future__ import annotations

import subprocess


def test_lintian_reports_no_error(deb):
    r = subprocess.run(["lintian", "--fail-on", "error", str(deb)], capture_output=True,
                       text=True, timeout=900)
    print(f"\nlintian: {r.stdout.strip() or 'no tags'}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert not [line for line in r.stdout.splitlines() if line.startswith("E:")]


def test_package_contents(deb):
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True,
                             check=True).stdout
    for path in ("./usr/bin/pgmq-dispatcher", "./lib/systemd/system/pgmq-dispatcher.service",
                 "./usr/share/man/man8/pgmq-dispatcher.8.gz",
                 "./etc/pgmq-dispatcher/pgmq-dispatcher.conf", "./etc/default/pgmq-dispatcher"):
        assert path in listing, path
    depends = subprocess.run(["dpkg-deb", "-f", str(deb), "Depends"], capture_output=True,
                             text=True, check=True).stdout
    for lib in ("libev4", "libpq5", "libcurl4", "libcjson1", "libinih1", "libmicrohttpd12"):
        assert lib in depends, depends
