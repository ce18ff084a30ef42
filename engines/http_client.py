"""JSON over HTTP for the engines that sample on a server: time-outs, bounded retries, one clear error.

A connection error or a 502/503/504 is retried with exponential backoff (``RETRIES`` times, from
``BACKOFF_SECONDS``); anything else fails at once. Every failure is an ``EngineError`` that names the
URL and what came back, so a down server or one answering garbage reads the same way everywhere.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import httpx

from colo.errors import EngineError

log = logging.getLogger(__name__)

RETRIES = 3
BACKOFF_SECONDS = 0.5
_RETRIED_STATUS = {502, 503, 504}


class HTTPJSON:
    def __init__(self, base_url: str, timeout: float = 300.0, api_key: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # generation can take minutes; connecting should not
        self.client = httpx.Client(timeout=httpx.Timeout(timeout, connect=10.0), headers=headers)

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: dict) -> Any:
        return self.request("POST", path, body)

    def request(self, method: str, path: str, body: dict | None = None, expect_json: bool = True) -> Any:
        url = self.base_url + path
        for attempt in range(RETRIES + 1):
            try:
                response = self.client.request(method, url, json=body)
            except httpx.TimeoutException as e:
                raise EngineError(f"{method} {url}: no answer within the time-out ({e}); is the server overloaded?") from None
            except httpx.TransportError as e:
                if attempt == RETRIES:
                    raise EngineError(f"{method} {url}: cannot reach the server after {RETRIES + 1} tries "
                                      f"({type(e).__name__}: {e}); is it running?") from None
                self._wait(attempt, url, e)
                continue
            if response.status_code in _RETRIED_STATUS and attempt < RETRIES:
                self._wait(attempt, url, f"HTTP {response.status_code}")
                continue
            if response.status_code >= 400:
                raise EngineError(f"{method} {url}: HTTP {response.status_code}: {_snippet(response.text)}")
            if not expect_json:
                return response.text
            try:
                return response.json()
            except ValueError:
                raise EngineError(f"{method} {url}: the answer is not JSON: {_snippet(response.text)}") from None
        raise AssertionError("unreachable")

    @staticmethod
    def _wait(attempt: int, url: str, why) -> None:
        delay = BACKOFF_SECONDS * 2 ** attempt
        log.warning("%s: %s; retrying in %.1f s", url, why, delay)
        time.sleep(delay)

    def close(self) -> None:
        self.client.close()


def field(data: Any, *path: str | int, url: str = "") -> Any:
    """``data[path[0]][path[1]]...``, or an EngineError that says which part of the answer was missing."""
    for key in path:
        try:
            data = data[key]
        except (KeyError, IndexError, TypeError):
            raise EngineError(f"{url}: unexpected answer, no {'/'.join(map(str, path))}: {_snippet(str(data))}") from None
    return data


def _snippet(text: str, limit: int = 300) -> str:
    text = text.strip().replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "..."
