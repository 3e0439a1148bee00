"""``lungedge serve --self-signed DIR``: a certificate for a clinic's LAN (the ``cryptography``
package, in the ``serve`` extra). Made once and kept: ``DIR/lungedge.crt`` (give it to the
browsers that should trust the page) and ``DIR/lungedge.key`` (mode 0600)."""

from __future__ import annotations

import datetime as _dt
import ipaddress
import os
import socket
from pathlib import Path
from typing import Tuple

#: how long a made certificate is valid (browsers refuse longer-lived server certificates)
VALID_DAYS = 397


def self_signed(folder: str) -> Tuple[str, str]:
    """(certificate, key) paths in ``folder``, made when missing; names this machine (its host
    name, ``localhost`` and its addresses).

    Raises:
        WriteError: the folder or the files cannot be written.
    """
    from lungedge.edge_runtime.errors import WriteError

    out = Path(folder)
    cert, key = out / "lungedge.crt", out / "lungedge.key"
    if cert.exists() and key.exists():
        return str(cert), str(key)
    try:
        out.mkdir(parents=True, exist_ok=True)
        cert_pem, key_pem = _make(socket.gethostname())
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key_pem)
        cert.write_bytes(cert_pem)
    except OSError as exc:
        raise WriteError(f"cannot write the certificate ({exc.strerror or exc}): {str(out)!r}") from None
    return str(cert), str(key)


def _make(host: str) -> Tuple[bytes, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"lungedge on {host}"[:64])])
    dns = sorted({host, f"{host}.local", "localhost"})
    alt = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(a)) for a in _addresses(host)]
    now = _dt.datetime.now(_dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - _dt.timedelta(minutes=5))
            .not_valid_after(now + _dt.timedelta(days=VALID_DAYS))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _addresses(host: str) -> list:
    """Loopback and this machine's addresses (those its host name resolves to, and the one it
    would use for the LAN); no packet is sent."""
    found = {"127.0.0.1", "::1"}
    try:
        found |= {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        pass
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # TEST-NET: only picks the route, sends nothing
            found.add(s.getsockname()[0])
    except OSError:
        pass
    return sorted(a.split("%")[0] for a in found)
