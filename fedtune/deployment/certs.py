"""Certificates and keys for a deployment, made with ``cryptography``.

Layout of a certificate folder (``fedtune certs init --dir certs``)::

    ca.crt  ca.key            the federation's own CA (keep ca.key offline)
    server.crt  server.key    the coordinator's TLS certificate, for the given hosts and IPs
    sites/<site>.key          a site's private EC key (OpenSSH format, what flower-supernode reads)
    sites/<site>.pub          its public key (what `flwr supernode register` reads)

Private keys are written with mode 0600 and are never overwritten without ``force``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedtune.io_utils import atomic_write_bytes

SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


class CertError(ValueError):
    """A certificate or key cannot be made as asked (the message says why)."""


@dataclass(frozen=True)
class CertPaths:
    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    @property
    def sites(self) -> Path:
        return self.root / "sites"

    def site_key(self, site: str) -> Path:
        return self.sites / f"{site}.key"

    def site_public_key(self, site: str) -> Path:
        return self.sites / f"{site}.pub"

    def site_public_keys(self) -> list[Path]:
        return sorted(self.sites.glob("*.pub")) if self.sites.is_dir() else []


def _write(path: Path, data: bytes, private: bool, force: bool) -> None:
    if path.exists() and not force:
        raise CertError(f"{path} already exists; pass --force to replace it")
    atomic_write_bytes(path, data)  # written to a 0600 temp file, then renamed into place
    os.chmod(path, 0o600 if private else 0o644)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedtune federation"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def create_ca(paths: CertPaths, days: int = 3650, force: bool = False) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    name = _name("fedtune federation CA")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    _write(paths.ca_key, _pem_key(key), private=True, force=force)
    _write(paths.ca_cert, cert.public_bytes(serialization.Encoding.PEM), private=False, force=force)


def _san(hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not re.fullmatch(r"[A-Za-z0-9*]([A-Za-z0-9.-]*[A-Za-z0-9])?", host):
                raise CertError(f"--host {host!r} is neither an IP address nor a DNS name") from None
            names.append(x509.DNSName(host))
    return names


def create_server_cert(paths: CertPaths, hosts: list[str], days: int = 825, force: bool = False) -> None:
    """The coordinator's TLS certificate, valid only for ``hosts`` (DNS names and IP addresses):
    a site connecting by any other name rejects it."""
    if not hosts:
        raise CertError("the coordinator's certificate needs at least one --host (DNS name or IP address)")
    ca_key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0])).issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(_san(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    _write(paths.server_key, _pem_key(key), private=True, force=force)
    _write(paths.server_cert, cert.public_bytes(serialization.Encoding.PEM), private=False, force=force)


def create_site_key(paths: CertPaths, site: str, force: bool = False) -> tuple[Path, Path]:
    """A site's EC P-384 key pair in OpenSSH format: the private half stays at the site, the
    public half is registered with the coordinator."""
    if not SITE_NAME.match(site):
        raise CertError(f"site name {site!r}: use letters, digits, '.', '_' or '-' (at most 63)")
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(paths.site_key(site), private, private=True, force=force)
    _write(paths.site_public_key(site), public + f" fedtune-site:{site}\n".encode(), private=False, force=force)
    return paths.site_key(site), paths.site_public_key(site)


def init_certs(root: Path, hosts: list[str], sites: list[str], days: int = 825, force: bool = False) -> CertPaths:
    """CA, coordinator certificate and one key pair per site, checked before anything is written."""
    paths = CertPaths(Path(root))
    targets = [paths.ca_key, paths.ca_cert, paths.server_key, paths.server_cert]
    targets += [p for s in sites for p in (paths.site_key(s), paths.site_public_key(s))]
    existing = [str(p) for p in targets if p.exists()]
    if existing and not force:
        raise CertError(f"already exist: {', '.join(existing)}; pass --force to replace them")
    _san(hosts)  # refuse a bad host name before writing anything
    for s in sites:
        if not SITE_NAME.match(s):
            raise CertError(f"site name {s!r}: use letters, digits, '.', '_' or '-' (at most 63)")
    paths.root.mkdir(parents=True, exist_ok=True)
    create_ca(paths, force=force)
    create_server_cert(paths, hosts, days=days, force=force)
    for s in sites:
        create_site_key(paths, s, force=force)
    return paths
