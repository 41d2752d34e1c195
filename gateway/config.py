"""The gateway's configuration, built once from the command line and validated here."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from gateway.keys import check_secret
from gateway.pricing import PriceBook
from gateway.store import DEFAULT_URL, check_url


class ConfigError(ValueError):
    """A flag or file is invalid; the message names it."""


def parse_engine_address(text: str) -> str:
    """'HOST:PORT' (IPv6 as '[::1]:PORT') -> the same text, checked."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--engine: {text!r} is not HOST:PORT")
    return f"{host}:{int(port)}"


def read_keys_file(path: Path) -> tuple[str, ...]:
    """One key per line; blank lines and lines starting with '#' are skipped."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--api-keys-file: cannot read {path}: {exc}") from None
    keys = tuple(line.strip() for line in lines if line.strip() and not line.strip().startswith("#"))
    if not keys:
        raise ConfigError(f"--api-keys-file: {path} holds no key")
    return keys


@dataclass(frozen=True)
class GatewayConfig:
    engines: tuple[str, ...]
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()
    # Serving without keys must be asked for explicitly (--no-auth).
    no_auth: bool = False
    prices: PriceBook = field(default_factory=PriceBook)
    max_body_bytes: int = 8 << 20
    # Seconds between health checks of a ready engine; a failing one is retried with
    # exponential backoff from health_interval / 10 up to max_backoff.
    health_interval: float = 1.0
    max_backoff: float = 5.0
    # Where keys and the usage ledger live (gateway.store): sqlite:///PATH or postgresql://...
    usage_db: str = DEFAULT_URL
    # The HMAC secret of stored keys (gateway.keys); None: only command-line keys are accepted.
    key_secret: bytes | None = field(default=None, repr=False)
    # How long a key looked up in the store is trusted before it is read again.
    key_cache_seconds: float = 5.0
    # After SIGTERM/SIGINT, how long requests in flight may run on before they are cancelled.
    drain_timeout: float = 30.0

    def __post_init__(self) -> None:
        if not self.engines:
            raise ConfigError("--engine: at least one engine address is required")
        for address in self.engines:
            parse_engine_address(address)
        if len(set(self.engines)) != len(self.engines):
            raise ConfigError("--engine: an address is listed twice")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"--port: must be in [0, 65535], got {self.port}")
        if any(not k or any(c.isspace() for c in k) for k in self.api_keys):
            raise ConfigError("--api-key: keys must be non-empty and hold no whitespace")
        if not self.api_keys and self.key_secret is None and not self.no_auth:
            raise ConfigError("no API key configured: give --api-key KEY or --api-keys-file FILE, or --key-secret-file "
                              "FILE to accept the keys of the usage store (or --no-auth to serve without "
                              "authentication)")
        if (self.api_keys or self.key_secret is not None) and self.no_auth:
            raise ConfigError("--no-auth contradicts the API keys given")
        if self.key_secret is not None:
            try:
                check_secret(self.key_secret)
            except ValueError as exc:
                raise ConfigError(f"--key-secret-file: {exc}") from None
        try:
            check_url(self.usage_db)
        except ValueError as exc:
            raise ConfigError(f"--usage-db: {exc}") from None
        if not 0 <= self.key_cache_seconds <= 3600:
            raise ConfigError(f"--key-cache-seconds: must be in [0, 3600], got {self.key_cache_seconds}")
        if self.max_body_bytes < 1024:
            raise ConfigError(f"--max-body-bytes: must be at least 1024, got {self.max_body_bytes}")
        if not 0 < self.health_interval <= 60 or not self.health_interval <= self.max_backoff <= 600:
            raise ConfigError("--health-interval must be in (0, 60] seconds and at most --max-backoff (<= 600)")
        if not 0 <= self.drain_timeout < float("inf"):
            raise ConfigError(f"--drain-timeout: must be a number of seconds >= 0, got {self.drain_timeout}")
