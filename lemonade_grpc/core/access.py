"""Who may call what: bearer tokens and their roles. Pure; the gRPC side is `api/auth.py`.

An admin token may call everything. An inference token may call
`Inference` and the read-only `ModelControl` calls (Status, Watch,
ListModels, Plan), not Load, Unload or Pin. Health and reflection stay open to
all (probes and tools need them before they hold a token). With no token
configured, every call is allowed, and the server keeps to loopback unless
told otherwise (`--insecure-allow-remote`).

Tokens come from files or environment variables, never from the command
line (arguments show in `ps`). A presented token is compared with every
configured one in constant time (`hmac.compare_digest`), so the time taken
says nothing of how much of it matched, nor which role it holds.
"""

from __future__ import annotations

import enum
import hmac
from dataclasses import dataclass

# Shorter tokens are refused at start-up: guessable.
MIN_TOKEN_LENGTH = 16


class Role(enum.Enum):
    ADMIN = "admin"
    INFERENCE = "inference"


# Calls an inference token may make besides Inference's.
READ_ONLY_CONTROL = frozenset({"Status", "Watch", "ListModels", "Plan"})
OPEN_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.")


def required_role(method: str) -> Role | None:
    """The least role `method` (a gRPC path, /package.Service/Method) needs; None: open to all."""
    service, _, name = method.lstrip("/").partition("/")
    if service.startswith(OPEN_SERVICES):
        return None
    if service == "lemonade.v1.Inference" or (
        service == "lemonade.v1.ModelControl" and name in READ_ONLY_CONTROL
    ):
        return Role.INFERENCE
    return Role.ADMIN


def allows(role: Role, needed: Role) -> bool:
    return role is Role.ADMIN or needed is Role.INFERENCE


@dataclass(frozen=True, slots=True)
class Tokens:
    """The configured tokens of each role. Empty: authentication off."""

    admin: tuple[bytes, ...] = ()
    inference: tuple[bytes, ...] = ()

    @property
    def enabled(self) -> bool:
        return bool(self.admin or self.inference)

    def role_of(self, presented: bytes) -> Role | None:
        """The role `presented` holds, or None. Compares with every token, in constant time each."""
        found: Role | None = None
        for role, tokens in ((Role.ADMIN, self.admin), (Role.INFERENCE, self.inference)):
            for token in tokens:
                if hmac.compare_digest(presented, token) and found is None:
                    found = role
        return found


def parse_tokens(text: str) -> tuple[str, ...]:
    """The tokens in a token file: one per line; blank lines and `#` comments skipped."""
    lines = (line.strip() for line in text.splitlines())
    return tuple(line for line in lines if line and not line.startswith("#"))
