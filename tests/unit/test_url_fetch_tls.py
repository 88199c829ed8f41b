"""An https image_url is fetched from the address the check resolved, yet its certificate is verified
against the URL's host name (docs/clip-retrieval.md): a test CA, certificates for the name, for the
address and for another name, and an HTTPS site on loopback (`cryptography` comes with moto)."""

from __future__ import annotations

import datetime as dt
import http.server
import ipaddress
import socket
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from fastapi import HTTPException
from helpers.loopback import start as start_server

from rayclip.http import clip_back

HOST = "img.test"  # resolved by the test alone (the .test domain is reserved, never in public DNS)
IMAGE = b"\xff\xd8\xff image bytes"


def _certificate(san: x509.GeneralName | None, key, issuer: tuple | None = None) -> x509.Certificate:
    """A site certificate for `san` signed by `issuer` ((certificate, key) of a CA) or by its own key;
    without `san`, a CA."""
    now = dt.datetime.now(dt.timezone.utc)
    common_name = "rayclip test CA" if san is None else "rayclip test site"  # never the host: names are in SAN
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    issuer_name, issuer_key = (issuer[0].subject, issuer[1]) if issuer else (name, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=san is None, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    )
    if san is None:
        signs = dict(key_cert_sign=True, crl_sign=True, content_commitment=False, key_encipherment=False)
        others = dict(data_encipherment=False, key_agreement=False, encipher_only=False, decipher_only=False)
        builder = builder.add_extension(x509.KeyUsage(digital_signature=True, **signs, **others), critical=True)
    else:
        builder = builder.add_extension(x509.SubjectAlternativeName([san]), critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict:
    """The trusted CA's file, and (certificate, key) files of each site certificate."""
    folder = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate(None, ca_key)
    (folder / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    sites = {
        "the host name": (x509.DNSName(HOST), (ca, ca_key)),
        "the address connected to": (x509.IPAddress(ipaddress.ip_address("127.0.0.1")), (ca, ca_key)),
        "another name": (x509.DNSName("other.test"), (ca, ca_key)),
        "the host name, self-signed": (x509.DNSName(HOST), None),
    }
    files = {"ca": folder / "ca.pem"}
    for i, (label, (san, issuer)) in enumerate(sites.items()):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(san, key, issuer)
        cert_file, key_file = folder / f"site{i}.pem", folder / f"site{i}.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        files[label] = (cert_file, key_file)
    return files


class _Site(http.server.BaseHTTPRequestHandler):
    """Answers every GET with IMAGE, recording (path, Host) of what it was asked."""

    seen: list[tuple[str, str]] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.seen.append((self.path, self.headers["Host"]))
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(IMAGE)))
        self.end_headers()
        self.wfile.write(IMAGE)

    def log_message(self, *args) -> None:
        pass


@dataclass(frozen=True)
class HttpsSites:
    start: Callable[[str], int]  # start(label): an HTTPS site on 127.0.0.1 with that certificate; its port
    server_names: list[str]  # the TLS server names (SNI) the clients sent, as they came


@pytest.fixture
def https_site(pki) -> Iterator[HttpsSites]:
    """HTTPS sites on loopback, each with one of the test certificates, shut down after the test."""
    servers, server_names = [], []

    def start(label: str) -> int:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*pki[label])
        context.sni_callback = lambda _conn, name, _ctx: server_names.append(name)
        # Handshakes as it accepts.
        server = start_server(_Site, wrap=lambda sock: context.wrap_socket(sock, server_side=True))
        servers.append(server)
        return server.server_address[1]

    _Site.seen.clear()
    yield HttpsSites(start, server_names)
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def trusting_the_test_ca(pki, monkeypatch):
    """The trust store the fetch's client verifies with by default (httpx's: certifi's bundle) holds
    only the test CA, and HOST resolves to 127.0.0.1 once, then to an address nothing listens on
    (DNS rebinding: a second lookup would fail the fetch)."""
    import certifi

    monkeypatch.setattr(certifi, "where", lambda: str(pki["ca"]))
    real, answers = socket.getaddrinfo, iter(["127.0.0.1"] + ["127.0.0.2"] * 10)
    monkeypatch.setattr(
        socket, "getaddrinfo", lambda host, *a, **kw: real(next(answers) if host == HOST else host, *a, **kw)
    )


def loopback(address) -> bool:
    return str(address) == "127.0.0.1"  # instead of is_public_address: loopback is all a test may reach


def test_a_certificate_for_the_host_name_is_accepted(https_site, trusting_the_test_ca):
    start, server_names = https_site.start, https_site.server_names
    port = start("the host name")
    assert clip_back.fetch_image(f"https://{HOST}:{port}/cat.jpg", 1 << 20, allowed=loopback) == IMAGE
    assert _Site.seen == [("/cat.jpg", f"{HOST}:{port}")] and server_names == [HOST]


@pytest.mark.parametrize("label", ["the address connected to", "another name", "the host name, self-signed"])
def test_a_certificate_not_for_the_host_name_or_untrusted_is_refused(https_site, trusting_the_test_ca, label):
    """Refused before any request is sent, with the service's one line (HTTP 422). The certificate
    for 127.0.0.1, the address the fetch connects to, is refused too: the name is what is checked."""
    start, server_names = https_site.start, https_site.server_names
    port = start(label)
    with pytest.raises(HTTPException) as refused:
        clip_back.fetch_image(f"https://{HOST}:{port}/cat.jpg", 1 << 20, allowed=loopback)
    assert (refused.value.status_code, refused.value.detail) == (422, "image_url could not be fetched: ConnectError")
    assert server_names == [HOST] and _Site.seen == []  # the handshake began, and no request followed it
