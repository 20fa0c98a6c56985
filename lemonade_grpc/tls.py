"""TLS for the gRPC port: certificate and key files, an optional client CA (mutual TLS), reload on SIGHUP.

gRPC asks `fetch` for a new configuration at each new handshake; `reload`
(the SIGHUP handler) reads the files again and hands the result to the
next handshake. Connections already up keep their session: no stream is
dropped. Files that cannot be read keep the configuration in force, and
say why.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TLSFiles:
    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None  # set: clients must present a certificate it signed


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
        """The configuration the files hold now; raises OSError when one cannot be read."""
        ca = self.files.client_ca_file.read_bytes() if self.files.client_ca_file is not None else None
        pair = (self.files.key_file.read_bytes(), self.files.cert_file.read_bytes())
        return grpc.ssl_server_certificate_configuration([pair], root_certificates=ca)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            pending, self._pending = self._pending, None
        return pending

    def reload(self) -> bool:
        """Read the files again for the next handshakes; False (logged) when they cannot be read."""
        try:
            configuration = self._read()
        except OSError as error:
            log.error("TLS: cannot reload the certificate, keeping the one in use: %s", error)
            return False
        with self._lock:
            self._pending = configuration
        log.info("TLS: certificate reloaded from %s", self.files.cert_file)
        return True
