"""Service credentials: who may call the scheduler, cache and billing, and AdminService.

Why: the internal ports used to trust anyone who could reach them, so any pod could bill any
tenant, read any tenant's usage, write cache entries or run unbilled inference. Now every
internal call carries a shared service token (`SHEPHERD_INTERNAL_TOKEN`, a Kubernetes Secret
in a cluster) in the `x-shepherd-internal-token` metadata entry, and operators' calls carry an
admin key (`SHEPHERD_ADMIN_KEYS`) as `authorization: Bearer <key>`. Both are comma-separated
lists: the first token is the one sent and every listed one is accepted, so a secret rotates
without downtime (deploy the new value second, then first, then drop the old one).

Health checks and reflection stay open, for Kubernetes probes and `grpcurl list`. The token
authenticates the calling service; it does not encrypt. Where pods talk over an untrusted
network, run a service mesh (Linkerd, Istio) for mTLS as well (deploy/k8s/README.md).
"""

from __future__ import annotations

import enum
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc

from libs.config import ConfigError, env_str

INTERNAL_TOKEN_HEADER = "x-shepherd-internal-token"
MIN_SECRET_CHARS = 16
# Open to everyone: liveness/readiness probes and service discovery carry no secrets.
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class Access(enum.Enum):
    """Which credential a method needs."""

    INTERNAL = "internal"  # the service token: calls between Shepherd's own services
    ADMIN = "admin"  # an admin key: AdminService
    INTERNAL_OR_ADMIN = "internal-or-admin"  # operators' read-only calls, and the router


def _secrets(name: str, env: Mapping[str, str] | None) -> tuple[str, ...]:
    values = tuple(v.strip() for v in env_str(name, "", env).split(",") if v.strip())
    short = [v for v in values if len(v) < MIN_SECRET_CHARS]
    if short:
        raise ConfigError(
            f"{name}: every value must be at least {MIN_SECRET_CHARS} characters"
            " (generate one with `openssl rand -hex 32`)"
        )
    return values


@dataclass(frozen=True)
class Credentials:
    """The secrets one process holds: service tokens, and admin keys where it serves admins."""

    internal_tokens: tuple[str, ...]
    admin_keys: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Credentials:
        tokens = _secrets("SHEPHERD_INTERNAL_TOKEN", env)
        if not tokens:
            raise ConfigError(
                "SHEPHERD_INTERNAL_TOKEN is not set: Shepherd's services authenticate each "
                "other with a shared token; give every service the same value (generate one "
                "with `openssl rand -hex 32`; `make run` makes one for you)"
            )
        return cls(internal_tokens=tokens, admin_keys=_secrets("SHEPHERD_ADMIN_KEYS", env))

    def outbound_metadata(self) -> tuple[tuple[str, str], ...]:
        """What every call to a peer service carries."""
        return ((INTERNAL_TOKEN_HEADER, self.internal_tokens[0]),)


def _one_of(presented: str, accepted: Sequence[str]) -> bool:
    """Constant-time comparison against every accepted secret, so timing reveals nothing."""
    found = False
    for secret in accepted:
        found |= hmac.compare_digest(presented.encode(), secret.encode())
    return found


class AmbiguousCredential(ValueError):
    """A credential entry sent more than once, or not as text: which one counts is unclear."""


def _metadata_value(metadata: Sequence[tuple[str, str | bytes]] | None, key: str) -> str:
    """The one `key` entry's text, or "" when there is none.

    Two entries are refused rather than judged by whichever comes first or last: a proxy
    that adds its own must not decide whose call this is.
    """
    values = [value for name, value in metadata or () if name == key]
    if len(values) > 1:
        raise AmbiguousCredential(f"send one '{key}' metadata entry, not {len(values)}")
    if not values:
        return ""
    if not isinstance(values[0], str):
        raise AmbiguousCredential(f"the '{key}' metadata entry must be text")
    return values[0]


def bearer(metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
    """The key of an `authorization: Bearer <key>` entry, or "" when there is none.

    Raises AmbiguousCredential when there are several `authorization` entries.
    """
    scheme, _, key = _metadata_value(metadata, "authorization").partition(" ")
    return key.strip() if scheme.lower() == "bearer" else ""


def check_access(
    credentials: Credentials,
    access: Access,
    metadata: Sequence[tuple[str, str | bytes]] | None,
) -> tuple[grpc.StatusCode, str] | None:
    """None when the metadata carries what `access` needs, else the status and why."""
    try:
        token = _metadata_value(metadata, INTERNAL_TOKEN_HEADER)
        admin = bearer(metadata)
    except AmbiguousCredential as error:
        return grpc.StatusCode.UNAUTHENTICATED, str(error)
    token_ok = bool(token) and _one_of(token, credentials.internal_tokens)
    admin_ok = (
        bool(admin) and bool(credentials.admin_keys) and _one_of(admin, credentials.admin_keys)
    )
    if access is Access.INTERNAL and token_ok:
        return None
    if access is Access.ADMIN and admin_ok:
        return None
    if access is Access.INTERNAL_OR_ADMIN and (token_ok or admin_ok):
        return None
    if token and not token_ok:
        return grpc.StatusCode.UNAUTHENTICATED, (
            f"the service token in '{INTERNAL_TOKEN_HEADER}' is not valid: it must equal one of"
            " SHEPHERD_INTERNAL_TOKEN's values on this service"
        )
    if admin and not admin_ok:
        reason = "is not valid" if credentials.admin_keys else "cannot be checked"
        hint = "" if credentials.admin_keys else ": no admin keys are set (SHEPHERD_ADMIN_KEYS)"
        return grpc.StatusCode.UNAUTHENTICATED, f"the admin key {reason}{hint}"
    if access is Access.ADMIN:
        if token_ok:
            return grpc.StatusCode.PERMISSION_DENIED, (
                "this method needs an admin key; the service token does not grant admin rights"
            )
        return grpc.StatusCode.UNAUTHENTICATED, (
            "this method needs an admin key: send metadata 'authorization: Bearer <admin key>'"
            " (one of SHEPHERD_ADMIN_KEYS; grpcurl: -H 'authorization: Bearer <admin key>')"
        )
    if access is Access.INTERNAL_OR_ADMIN:
        return grpc.StatusCode.UNAUTHENTICATED, (
            "this is an internal Shepherd service: send an admin key as 'authorization: Bearer"
            f" <admin key>', or the service token in '{INTERNAL_TOKEN_HEADER}'"
        )
    return grpc.StatusCode.UNAUTHENTICATED, (
        "this is an internal Shepherd service: only Shepherd's own services may call it, with"
        f" the service token in metadata '{INTERNAL_TOKEN_HEADER}' (SHEPHERD_INTERNAL_TOKEN)"
    )


class AccessPolicy:
    """Which credential each method needs; the service gate (libs/gate.py) enforces it.

    `rules` maps a full method name (`/pkg.Service/Method`) or a service prefix
    (`/pkg.Service/`) to its Access; other methods need the service token. Health and
    reflection are open to everyone, so probes and `grpcurl list` work without secrets.
    """

    def __init__(self, credentials: Credentials, rules: Mapping[str, Access] | None = None) -> None:
        self._credentials = credentials
        self._rules = dict(rules or {})

    def access(self, method: str) -> Access | None:
        """What `method` needs, or None when it is open."""
        if method.startswith(OPEN_PREFIXES):
            return None
        if method in self._rules:
            return self._rules[method]
        service = method[: method.rfind("/") + 1]
        return self._rules.get(service, Access.INTERNAL)

    def refusal(
        self, access: Access, metadata: Sequence[tuple[str, str | bytes]] | None
    ) -> tuple[grpc.StatusCode, str] | None:
        """None when `metadata` carries what `access` needs, else the status and why."""
        return check_access(self._credentials, access, metadata)
