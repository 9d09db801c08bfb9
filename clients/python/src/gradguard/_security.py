"""Where and how the gRPC transport connects: plaintext or TLS (and mutual
TLS), and the bearer token, from `watch()`'s options or the environment.

Conventions shared with the Rust CLI: `https://host:port` is TLS, `http://`
plaintext, and a bare `host:port` TLS when a CA or client certificate is given
(by option or variable), else plaintext; `GRADGUARD_TOKEN` (or `GRADGUARD_TOKEN_FILE`,
trailing whitespace stripped) is the token, sent as `authorization: Bearer`
metadata; `GRADGUARD_TLS_CA` verifies the server (else the system roots);
`GRADGUARD_TLS_CLIENT_CERT` and `GRADGUARD_TLS_CLIENT_KEY` are the client's
certificate and key for mutual TLS. Everything is read and checked when the
guard is made, so a bad option raises there, not in the background.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    import grpc

log = logging.getLogger("gradguard")

ENV_SERVER = "GRADGUARD_SERVER"
ENV_TOKEN = "GRADGUARD_TOKEN"
ENV_TOKEN_FILE = "GRADGUARD_TOKEN_FILE"
ENV_TLS_CA = "GRADGUARD_TLS_CA"
ENV_TLS_CERT = "GRADGUARD_TLS_CLIENT_CERT"
ENV_TLS_KEY = "GRADGUARD_TLS_CLIENT_KEY"
DEFAULT_SERVER = "localhost:50051"


class Token:
    """A bearer token. It never shows itself: not in repr, str, logs or the
    messages of exceptions; only `metadata()` carries it, onto the wire."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self._value}"),)

    def __repr__(self) -> str:
        return "Token(<redacted>)"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("a gradguard token is not pickled")


@dataclass(frozen=True)
class Endpoint:
    """A gRPC target and what to connect to it with."""

    target: str  # as gRPC takes it: host:port, without a scheme
    tls: bool = False
    root_certificates: bytes | None = field(default=None, repr=False)
    private_key: bytes | None = field(default=None, repr=False)
    certificate_chain: bytes | None = field(default=None, repr=False)
    token: Token | None = None

    @classmethod
    def parse(cls, server: str) -> Endpoint:
        """A server address alone, nothing from the environment."""
        target, tls = _split(server)
        return cls(target, tls=bool(tls))

    def __str__(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.target}"

    def channel(self, options: list[tuple[str, object]]) -> grpc.Channel:
        import grpc

        if not self.tls:
            return grpc.insecure_channel(self.target, options=options)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.private_key,
            certificate_chain=self.certificate_chain,
        )
        return grpc.secure_channel(self.target, credentials, options=options)

    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        """Call metadata for the stream (the token, if any)."""
        return self.token.metadata() if self.token is not None else None


def _split(server: str) -> tuple[str, bool | None]:
    """`(target, tls)`: tls True for https://, False for http:// or grpc://,
    None for a bare address (other gRPC target forms pass through)."""
    if not isinstance(server, str) or not server.strip():
        raise ValueError(f"server must be host:port or https://host:port, got {server!r}")
    tls: bool | None = None
    target = server.strip()
    for scheme, secure in (("https://", True), ("http://", False), ("grpc://", False)):
        if target.lower().startswith(scheme):
            target, tls = target[len(scheme) :].rstrip("/"), secure
            break
    if not target or (tls is not None and "/" in target):
        raise ValueError(f"server must be host:port or https://host:port, got {server!r}")
    return target, tls


def _option(value: str | os.PathLike[str] | None, name: str, env: Mapping[str, str], env_name: str) -> tuple[str, str]:
    """`(value, where it came from)`: the option given, else the variable."""
    if value is not None:
        return os.fspath(value), name
    return env.get(env_name, ""), env_name


def _read(path: str, source: str, pem: bool) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"{source}: cannot read {path}: {e.strerror or e}") from None
    if pem and b"-----BEGIN " not in data:
        raise ValueError(f"{source}: {path} is not PEM (no -----BEGIN line)")
    return data


def _token(token: str | None, env: Mapping[str, str]) -> Token | None:
    if token is not None:
        value, source = token, "token"
        if not isinstance(token, str):
            raise ValueError(f"token must be a string, got {type(token).__name__}")
    elif env.get(ENV_TOKEN):
        value, source = env[ENV_TOKEN], ENV_TOKEN
    elif env.get(ENV_TOKEN_FILE):
        path = env[ENV_TOKEN_FILE]
        value = _read(path, ENV_TOKEN_FILE, pem=False).decode("utf-8", "replace").rstrip()
        source = f"{ENV_TOKEN_FILE} ({path})"
    else:
        return None
    if not value:
        raise ValueError(f"{source}: the bearer token is empty")
    # An authorization header takes visible ASCII only; say so without the value.
    if not all("!" <= c <= "~" for c in value):
        raise ValueError(
            f"{source}: the bearer token has characters an authorization header cannot carry "
            "(spaces, control characters or non-ASCII)"
        )
    return Token(value)


def resolve(
    server: str | None,
    *,
    token: str | None = None,
    tls_ca: str | os.PathLike[str] | None = None,
    tls_cert: str | os.PathLike[str] | None = None,
    tls_key: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> Endpoint:
    """The endpoint of `watch(server=..., token=..., tls_ca=..., tls_cert=...,
    tls_key=...)`, each option falling back on its environment variable.
    Raises ValueError naming the option (or variable) and the path."""
    env = os.environ if env is None else env
    if server is None:
        server = env.get(ENV_SERVER) or DEFAULT_SERVER
    target, scheme_tls = _split(server)

    ca, ca_from = _option(tls_ca, "tls_ca", env, ENV_TLS_CA)
    cert, cert_from = _option(tls_cert, "tls_cert", env, ENV_TLS_CERT)
    pkey, key_from = _option(tls_key, "tls_key", env, ENV_TLS_KEY)
    files = [source for value, source in ((ca, ca_from), (cert, cert_from), (pkey, key_from)) if value]
    if scheme_tls is False and files:
        raise ValueError(f"{', '.join(files)} given, but server {server!r} is plaintext (http://): use https://")
    tls = scheme_tls if scheme_tls is not None else bool(files)

    roots = key = chain = None
    if tls:
        if bool(cert) != bool(pkey):
            have, lack = (cert_from, "tls_key or " + ENV_TLS_KEY) if cert else (key_from, "tls_cert or " + ENV_TLS_CERT)
            raise ValueError(f"{have} given without {lack}: mutual TLS needs the client certificate and its key")
        roots = _read(ca, ca_from, pem=True) if ca else None
        if cert:
            chain = _read(cert, cert_from, pem=True)
            key = _read(pkey, key_from, pem=True)

    bearer = _token(token, env)
    endpoint = Endpoint(
        target, tls=tls, root_certificates=roots, private_key=key, certificate_chain=chain, token=bearer
    )
    if bearer is not None and not tls:
        log.warning(
            "gradguard: sending the bearer token to %s over plaintext; anyone on the path can read it (use https://)",
            target,
        )
    return endpoint
