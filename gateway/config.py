"""The gateway's configuration, built once from the command line and validated here."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from gateway.pricing import PriceBook


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
        if not self.api_keys and not self.no_auth:
            raise ConfigError("no API key configured: give --api-key KEY or --api-keys-file FILE "
                              "(or --no-auth to serve without authentication)")
        if self.api_keys and self.no_auth:
            raise ConfigError("--no-auth contradicts the API keys given")
        if self.max_body_bytes < 1024:
            raise ConfigError(f"--max-body-bytes: must be at least 1024, got {self.max_body_bytes}")
        if not 0 < self.health_interval <= 60 or not self.health_interval <= self.max_backoff <= 600:
            raise ConfigError("--health-interval must be in (0, 60] seconds and at most --max-backoff (<= 600)")
