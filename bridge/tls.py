"""The server TLS context: certificate and key from config, reloaded on change.

One ``SSLContext`` is handed to STARTTLS and the TLS-on-connect listener and
never changed.  Its SNI callback (called for every ClientHello, with or
without SNI) points each new handshake at the current context; a renewed
certificate is loaded into a fresh context and swapped in whole, so no
handshake ever sees a half-loaded pair.  A broken pair keeps the old one.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

from odmr_bridge.config import TlsSettings
from odmr_bridge.watch import Reloading

log = logging.getLogger("odmr_bridge.tls")


def server_context(settings: TlsSettings) -> ssl.SSLContext | None:
    if not settings.cert_file:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(settings.cert_file, settings.key_file)
    return context


class CertificateReloader:
    """Watches the certificate and key files; new handshakes use the newest good pair."""

    def __init__(self, context: ssl.SSLContext, settings: TlsSettings) -> None:
        self.settings = settings
        self.current = context
        context.sni_callback = self._select
        self._watches = [Reloading(path, self._load) for path in
                         dict.fromkeys((settings.cert_file, settings.key_file))]

    def _select(self, connection: ssl.SSLObject | ssl.SSLSocket, server_name: str | None,
                context: ssl.SSLContext) -> None:
        if self.current is not context:
            connection.context = self.current

    def _load(self, _: Path) -> None:
        # While the files are being rewritten (one, then the other) the pair
        # may not match: that raises, the old context stays, a later event loads.
        fresh = server_context(self.settings)
        if fresh is not None:
            self.current = fresh

    def start(self) -> None:
        for watch in self._watches:
            watch.start()

    def stop(self) -> None:
        for watch in self._watches:
            watch.stop()
