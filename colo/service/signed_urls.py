"""Signed, expiring URLs: a download link that carries its own permission, as object stores sign theirs.

A URL names one path on this service and an expiry time; its signature is an HMAC-SHA256 of both under
a secret drawn when the service starts. Whoever holds the URL may read that one path until it expires
(``urllib.request.urlretrieve`` sends no API key), and a changed path, expiry or signature fails the
check. The secret never leaves the process, so a restart ends every URL it signed: the client signs
new ones (``tinker_cookbook.weights.download`` already does when its URLs near their end).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from urllib.parse import quote, urlencode

from colo.service.errors import Forbidden

URL_SECONDS = 3600  # how long a signed URL is valid


class UrlSigner:
    def __init__(self, secret: bytes | None = None, seconds: int = URL_SECONDS) -> None:
        self._secret = secret if secret is not None else secrets.token_bytes(32)
        self.seconds = seconds

    def _signature(self, path: str, expires: int) -> str:
        return hmac.new(self._secret, f"{path}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def sign(self, base_url: str, path: str, now: float | None = None) -> tuple[str, int]:
        """(the full URL of ``path`` on ``base_url``, its expiry in Unix seconds)."""
        expires = int(time.time() if now is None else now) + self.seconds
        query = urlencode({"expires": expires, "signature": self._signature(path, expires)})
        return f"{base_url.rstrip('/')}{quote(path)}?{query}", expires

    def check(self, path: str, expires: str | None, signature: str | None, now: float | None = None) -> None:
        """Raise ``Forbidden`` unless ``signature`` is this service's for ``path`` and ``expires``, and the
        time is before ``expires``."""
        if not expires or not signature or not expires.isdigit():
            raise Forbidden("this URL is not signed; allowed: a URL from external_weights_urls, unchanged")
        if not hmac.compare_digest(self._signature(path, int(expires)), signature):
            raise Forbidden("the URL's signature does not match its path and expiry (changed, or signed by an "
                            "earlier run of the service); allowed: a URL from external_weights_urls, unchanged")
        if int(expires) <= (time.time() if now is None else now):
            raise Forbidden(f"the URL expired at {int(expires)} (Unix seconds); get new ones from "
                            "external_weights_urls")
