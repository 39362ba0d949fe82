"""Test certificate authorities made at test time with openssl(1).

    ca = TestCA(tmp_dir, "Test CA")                      # self-signed root, ca.cert (PEM)
    cert, key = ca.issue("server", dns=["pg.test"], ips=["127.0.0.1"])

Keys are EC P-256 (fast to make); certificates last one day. Nothing here is trusted by the
system store: a client trusts a CA only when given ``ca.cert``.
"""

import os
import subprocess


def _openssl(*args, cwd):
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


class TestCA:
    """A self-signed CA in ``directory`` (created if needed), named ``name``."""

    __test__ = False  # not a pytest test class

    def __init__(self, directory, name):
        os.makedirs(directory, exist_ok=True)
        self.dir = directory
        self.slug = name.lower().replace(" ", "-")
        self.key = os.path.join(directory, f"{self.slug}.key")
        self.cert = os.path.join(directory, f"{self.slug}.pem")
        _openssl("req", "-x509", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                 "-nodes", "-keyout", self.key, "-out", self.cert, "-days", "1",
                 "-subj", f"/CN={name}",
                 "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)

    def issue(self, stem, dns=(), ips=()):
        """A server certificate for the given names, signed by this CA.

        Returns (cert path, key path); the certificate file holds the leaf only."""
        key = os.path.join(self.dir, f"{stem}.key")
        csr = os.path.join(self.dir, f"{stem}.csr")
        cert = os.path.join(self.dir, f"{stem}.pem")
        ext = os.path.join(self.dir, f"{stem}.ext")
        alt = ",".join([f"DNS:{d}" for d in dns] + [f"IP:{i}" for i in ips])
        with open(ext, "w", encoding="ascii") as f:
            f.write(f"subjectAltName={alt}\nbasicConstraints=CA:FALSE\n"
                    "keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n")
        _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                 "-keyout", key, "-out", csr, "-subj", f"/CN={(list(dns) + list(ips))[0]}",
                 cwd=self.dir)
        _openssl("x509", "-req", "-in", csr, "-CA", self.cert, "-CAkey", self.key,
                 "-CAcreateserial", "-out", cert, "-days", "1", "-extfile", ext, cwd=self.dir)
        os.chmod(key, 0o600)
        return cert, key
