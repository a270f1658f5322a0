"""Fixtures shared by the whole suite: TLS certificates made by ``trustme``.

One certificate authority per test session (key generation is the slow
part); its server certificate is valid for ``localhost`` and ``127.0.0.1``.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import attrs
import pytest
import trustme


@attrs.frozen
class TLSFiles:
    """PEM files of a test CA and a server certificate it issued."""

    ca: str  #: the CA certificate (what a client trusts: ``--cafile``)
    cert: str  #: the server certificate chain (``--tls-cert``)
    key: str  #: the server's private key (``--tls-key``)

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts only this CA."""
        return ssl.create_default_context(cafile=self.ca)


@pytest.fixture(scope="session")
def tls_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def tls_files(tls_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    """A CA and a server certificate for ``localhost`` and ``127.0.0.1``, as PEM files."""
    folder: Path = tmp_path_factory.mktemp("tls")
    leaf = tls_ca.issue_cert("localhost", "127.0.0.1")
    files = TLSFiles(
        ca=str(folder / "ca.pem"), cert=str(folder / "cert.pem"), key=str(folder / "key.pem")
    )
    tls_ca.cert_pem.write_to_path(files.ca)
    Path(files.cert).write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(files.key)
    return files
