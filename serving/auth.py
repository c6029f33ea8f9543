"""Optional API-key auth: keys come from `CXRCF_API_KEYS` (comma-separated).

Off when no keys are set, which `cxrcf serve` allows only on a loopback address. Clients send
`X-API-Key: <key>` or `Authorization: Bearer <key>`. Replicas only ever see SHA-256 digests of the
keys (they travel in the deployment's user_config, which Ray Serve shows in its status), and keys
can be rotated at run time by redeploying with a new user_config.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Iterable, Mapping

from cxrcf.errors import CxrcfError

ENV_VAR = "CXRCF_API_KEYS"


def parse_keys(raw: str | None) -> list[str]:
    keys = [k.strip() for k in (raw or "").split(",")]
    return [k for k in keys if k]


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def digests(keys: Iterable[str]) -> list[str]:
    return sorted({digest(k) for k in keys})


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_host(host: str, keys: list[str]) -> None:
    """Refuse to expose the API beyond this machine without keys."""
    if not keys and not is_loopback(host):
        raise CxrcfError(f"serve.host: {host} is reachable from other machines; set {ENV_VAR} "
                         "(comma-separated API keys) or bind 127.0.0.1")


def presented_key(headers: Mapping[str, str]) -> str | None:
    key = headers.get("x-api-key")
    if key:
        return key.strip()
    scheme, _, token = (headers.get("authorization") or "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def authorized(headers: Mapping[str, str], allowed: Iterable[str]) -> bool:
    allowed = list(allowed)
    if not allowed:
        return True
    key = presented_key(headers)
    if key is None:
        return False
    seen = digest(key)
    # compare against every digest so the time taken does not reveal which one matched
    matches = [hmac.compare_digest(seen, d) for d in allowed]
    return any(matches)
