"""TLS for the gRPC port: certificate and key files, an optional client CA (mutual TLS), reload on SIGHUP.

gRPC asks `fetch` for a new configuration at each new handshake; `reload`
(the SIGHUP handler) reads the files again and hands the result to the
next handshake. Connections already up keep their session: no stream is
dropped. Files that cannot be read, or that do not make a usable
configuration (not PEM, a key that is not the certificate's, an empty
client CA), keep the configuration in force, and say why in our own log
line (issue 18 finding 8: gRPC core took them without a word at reload,
logged its own `Handshaker factory creation failed` at the next handshake
and kept the old certificate while our log said "reloaded").
"""

from __future__ import annotations

import contextlib
import logging
import os
import ssl
import threading
from collections.abc import Iterator

import grpc

from lemonade_grpc.core.settings import TLSFiles

log = logging.getLogger(__name__)


class TLSFilesInvalid(ValueError):
    """The TLS files can be read but do not make a usable server configuration."""


@contextlib.contextmanager
def _in_memory(data: bytes) -> Iterator[str]:
    """A path that reads `data` (a memfd): `ssl` takes paths only, and key material stays off disk."""
    fd = os.memfd_create("lemonade-grpc-tls", os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def _no_password() -> bytes:
    raise TLSFilesInvalid("the key is encrypted; gRPC needs an unencrypted key")


def check_pair(cert: bytes, key: bytes, client_ca: bytes | None) -> None:
    """Raise `TLSFilesInvalid` unless `cert` and `key` are PEM, match, and `client_ca` holds a certificate.

    OpenSSL's parse, as gRPC's own (BoringSSL) makes it at the handshake.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with _in_memory(cert) as cert_path, _in_memory(key) as key_path:
        try:
            context.load_cert_chain(cert_path, key_path, password=_no_password)
        except ssl.SSLError as error:
            problem = "the key does not belong to the certificate" if "MISMATCH" in str(error) else None
            raise TLSFilesInvalid(
                problem or f"not a PEM certificate and key ({error.reason or error})"
            ) from None
    if client_ca is not None:
        try:
            context.load_verify_locations(cadata=client_ca.decode("ascii", "replace"))
        except (ssl.SSLError, ValueError) as error:
            reason = error.reason if isinstance(error, ssl.SSLError) else str(error)
            raise TLSFilesInvalid(f"the client CA file holds no PEM certificate ({reason})") from None


class ReloadableCredentials:
    """Server credentials whose certificate can be replaced while the server runs."""

    def __init__(self, files: TLSFiles) -> None:
        self.files = files
        self._lock = threading.Lock()  # gRPC calls `fetch` from its own threads
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self.credentials = grpc.dynamic_ssl_server_credentials(
            self._read(),
            self._fetch,  # type: ignore[arg-type]  # None is "no change" (grpc's docs); the stubs omit it
            require_client_authentication=files.client_ca_file is not None,
        )

    def _read(self) -> grpc.ServerCertificateConfiguration:
        """The configuration the files hold now.

        Raises OSError when one cannot be read, `TLSFilesInvalid` when they are not a usable pair.
        """
        ca = self.files.client_ca_file.read_bytes() if self.files.client_ca_file is not None else None
        key, cert = self.files.key_file.read_bytes(), self.files.cert_file.read_bytes()
        check_pair(cert, key, ca)
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            pending, self._pending = self._pending, None
        return pending

    def reload(self) -> bool:
        """Read the files again for the next handshakes; False (logged) when they cannot be read."""
        try:
            configuration = self._read()
        except TLSFilesInvalid as error:
            log.error(
                "TLS: %s (%s, %s): keeping the certificate in use",
                error,
                self.files.cert_file,
                self.files.key_file,
            )
            return False
        except OSError as error:
            log.error("TLS: cannot reload the certificate, keeping the one in use: %s", error)
            return False
        with self._lock:
            self._pending = configuration
        log.info("TLS: certificate reloaded from %s", self.files.cert_file)
        return True
