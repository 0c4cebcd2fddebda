"""The server TLS context: certificate and key from config, reloaded on change.

One ``SSLContext`` serves STARTTLS and the TLS-on-connect listener.  Calling
``load_cert_chain`` again on the same context makes new handshakes use the
new files, so a renewed certificate needs no restart; a broken pair keeps
the old one and logs why.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

from bridge.config import TlsSettings
from bridge.watch import Reloading

log = logging.getLogger("bridge.tls")


def server_context(settings: TlsSettings) -> ssl.SSLContext | None:
    if not settings.cert_file:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(settings.cert_file, settings.key_file)
    return context


class CertificateReloader:
    """Watches the certificate and key files and reloads them into *context*."""

    def __init__(self, context: ssl.SSLContext, settings: TlsSettings) -> None:
        self.context = context
        self.settings = settings
        self._watches = [Reloading(path, self._load) for path in
                         dict.fromkeys((settings.cert_file, settings.key_file))]

    def _load(self, _: Path) -> None:
        # Try the pair on a scratch context first: a failed load_cert_chain can
        # leave a context with the new certificate and the old key.  While the
        # files are being rewritten (one, then the other) the pair does not
        # match; the later event loads it.
        server_context(self.settings)
        self.context.load_cert_chain(self.settings.cert_file, self.settings.key_file)

    def start(self) -> None:
        for watch in self._watches:
            watch.start()

    def stop(self) -> None:
        for watch in self._watches:
            watch.stop()
