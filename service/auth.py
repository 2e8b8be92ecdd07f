"""Optional API keys in the X-API-Key header (read-write, read-only), compared in constant time."""

from __future__ import annotations

import hmac
from typing import Literal

from service.errors import Forbidden, Unauthorized

Access = Literal["read", "write"]


def _same(given: str, expected: str | None) -> bool:
    if not expected:
        return False
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def check_access(given: str | None, needed: Access, *, api_key: str | None,
                 read_only_api_key: str | None) -> None:
    """Raise Unauthorized (401) or Forbidden (403) unless ``given`` allows ``needed``.

    With no key configured the service is open. With keys configured, a request needs
    a key: the read-write key allows everything, the read-only key allows reads only.
    """
    if not api_key and not read_only_api_key:
        return
    if not given:
        raise Unauthorized("this server requires an API key in the X-API-Key header")
    is_rw = _same(given, api_key)
    is_ro = _same(given, read_only_api_key)  # always compute both: no early exit
    if is_rw:
        return
    if is_ro:
        if needed == "read":
            return
        raise Forbidden("the read-only API key cannot modify data")
    raise Unauthorized("invalid API key")
