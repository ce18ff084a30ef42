"""API keys and the tenants they map to (``COLO_API_KEYS="key:tenant,..."``).

Every model, sampling session, request future and checkpoint belongs to one tenant, and a lookup by
another tenant finds nothing, exactly as if the id did not exist. With no keys configured the
service is open: every caller is the tenant ``default`` (the service binds 127.0.0.1 by default).
"""

from __future__ import annotations

import hmac
import re

from colo.errors import ConfigError

OPEN_TENANT = "default"
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


class Tenants:
    def __init__(self, key_tenants: dict[str, str]) -> None:
        for tenant in key_tenants.values():
            if not _NAME.fullmatch(tenant):
                raise ConfigError(f"COLO_API_KEYS: tenant {tenant!r}; allowed: 1-64 letters, digits, '_' or '-' "
                                  "(it names the tenant's checkpoint directory)")
        self._keys = dict(key_tenants)

    @property
    def open(self) -> bool:
        return not self._keys

    def tenant_of(self, api_key: str | None) -> str | None:
        """The caller's tenant, or None when the key is missing or unknown."""
        if self.open:
            return OPEN_TENANT
        if not api_key:
            return None
        for key, tenant in self._keys.items():
            if hmac.compare_digest(key.encode(), api_key.encode()):
                return tenant
        return None
