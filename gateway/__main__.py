"""Command line: `python -m gateway serve --engine HOST:PORT[,HOST:PORT...] ...` and
`python -m gateway keys create|list|revoke ...` (gateway.keys_cli).

A bad flag or file prints one `error:` line and exits 2. When listening, prints
`gateway serving on http://HOST:PORT` (the real port when --port is 0) and serves until
SIGINT or SIGTERM, then drains (gateway.app.drain) and exits 0. The key secret comes from
--key-secret-file, else from the environment variable MOESERVE_KEY_SECRET (read here only).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from moeserve.obs.logs import configure_logging
from moeserve.obs.tracing import TracingConfigError, setup_tracing

from gateway import keys_cli
from gateway.config import ConfigError, GatewayConfig, parse_engine_address, read_keys_file
from gateway.keys import check_secret
from gateway.pricing import PriceBook, PricesError, load_prices
from gateway.store import DEFAULT_URL, check_url

SECRET_ENV = "MOESERVE_KEY_SECRET"
log = logging.getLogger("gateway")

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        print(f"error: {message}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m gateway", description="moeserve gateway: OpenAI-compatible HTTP API over gRPC engines")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    s = sub.add_parser("serve", help="serve the OpenAI-compatible API")
    s.add_argument("--engine", required=True, action="append", metavar="HOST:PORT[,HOST:PORT...]",
                   help="engine replicas (repeatable, or comma-separated)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    s.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    s.add_argument("--api-key", action="append", default=[], metavar="KEY", help="an accepted API key (repeatable)")
    s.add_argument("--api-keys-file", type=Path, metavar="FILE", help="accepted API keys, one per line")
    s.add_argument("--no-auth", action="store_true", help="serve without API keys (never on a public address)")
    s.add_argument("--prices", type=Path, metavar="FILE", help="prices per model (JSON; see README)")
    s.add_argument("--max-body-bytes", type=int, default=8 << 20, metavar="N", help="largest request body")
    s.add_argument("--health-interval", type=float, default=1.0, metavar="SECONDS",
                   help="seconds between health checks of a ready engine")
    s.add_argument("--max-backoff", type=float, default=5.0, metavar="SECONDS",
                   help="longest wait between checks of an engine that is down")
    s.add_argument("--usage-db", default=DEFAULT_URL, metavar="URL",
                   help="keys and usage ledger: sqlite:///PATH or postgresql://USER@HOST:PORT/DB "
                        f"(default: {DEFAULT_URL})")
    s.add_argument("--key-secret-file", type=Path, metavar="FILE",
                   help=f"HMAC secret of the store's keys (else ${SECRET_ENV}); without one only "
                        "--api-key keys are accepted")
    s.add_argument("--key-cache-seconds", type=float, default=5.0, metavar="SECONDS",
                   help="how long a key read from the store is trusted (revokes take this long at most)")
    s.add_argument("--drain-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM/SIGINT, how long requests in flight may run on before they are cancelled")
    s.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    s.add_argument("--log-format", default="text", choices=["text", "json"],
                   help="json: one JSON object per line, with the request id")
    keys_cli.add_parser(sub)
    return p


def read_secret(path: Path | None, flag: str = "--key-secret-file") -> bytes | None:
    """The key secret from the file, else from the environment, else None."""
    if path is not None:
        try:
            return path.read_bytes().strip()
        except OSError as exc:
            raise ConfigError(f"{flag}: cannot read {path}: {exc.strerror or exc}") from None
    value = os.environ.get(SECRET_ENV, "")
    return value.encode().strip() or None


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    engines = tuple(parse_engine_address(a) for flag in args.engine for a in flag.split(",") if a.strip())
    keys = tuple(args.api_key) + (read_keys_file(args.api_keys_file) if args.api_keys_file else ())
    try:
        prices = load_prices(args.prices) if args.prices else PriceBook()
    except PricesError as exc:
        raise ConfigError(f"--prices: {exc}") from None
    # A secret from the environment does not contradict --no-auth; one from a flag does.
    secret = read_secret(args.key_secret_file) if args.key_secret_file or not args.no_auth else None
    return GatewayConfig(engines, args.host, args.port, keys, args.no_auth, prices, args.max_body_bytes,
                         args.health_interval, args.max_backoff, args.usage_db, secret, args.key_cache_seconds,
                         args.drain_timeout)


async def serve(cfg: GatewayConfig) -> None:
    from aiohttp import web

    from gateway.app import build_app, drain
    from gateway.state import SERVICES

    app = await build_app(cfg)
    # handler_cancellation: a client that disconnects cancels its handler, and so its gRPC call.
    # access_log=None: the edge middleware writes the access lines, with the request id.
    # shutdown_timeout: after the drain only answers being written out remain.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, cfg.host, cfg.port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(f"cannot listen on {cfg.host}:{cfg.port}: {exc.strerror or exc}") from None
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # before the line that says we serve: a signal then drains
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    host, port = runner.addresses[0][:2]
    store = app[SERVICES].store
    print(f"gateway serving on http://{host}:{port} (engines: {', '.join(cfg.engines)}; usage store: {store!r})",
          flush=True)
    if cfg.key_secret is None and not cfg.no_auth:
        log.warning("no key secret (--key-secret-file or %s): only command-line keys are accepted", SECRET_ENV)
    try:
        await stop.wait()
        await drain(app, site, cfg.drain_timeout, stop)
    finally:
        await runner.cleanup()  # closes the connections left, then the pool and the ledger (flushed)


def keys_command(args: argparse.Namespace) -> int:
    try:
        check_url(args.usage_db)
    except ValueError as exc:
        raise ConfigError(f"--usage-db: {exc}") from None
    secret = read_secret(args.key_secret_file) if args.keys_command == "create" else None
    if secret is not None:
        try:
            secret = check_secret(secret)
        except ValueError as exc:
            raise ConfigError(f"--key-secret-file: {exc}") from None
    try:
        return asyncio.run(keys_cli.run(args, secret))
    except keys_cli.KeysError as exc:
        raise ConfigError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "keys":
        logging.basicConfig(level="CRITICAL")  # failures reach the user as one error line
        args.usage_db = args.usage_db or DEFAULT_URL
        try:
            return keys_command(args)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
    configure_logging(args.log_level, args.log_format)
    try:
        setup_tracing("moeserve-gateway", os.environ)  # off unless OTEL_* configures it
        asyncio.run(serve(config_from_args(args)))
    except (ConfigError, TracingConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
