"""``avgate serve``: runs the enabled front-ends in one event loop.

Front-ends register in ``FRONTENDS`` (config section → "module:function"); each start
function is ``async def start(gateway: Gateway) -> list[Listener]``: it reads its own config
section from ``gateway.config`` and returns started listeners, objects with ``describe() ->
str`` (what it listens on) and ``async aclose()`` (stop accepting, finish in-flight work).
A front-end whose module does not exist yet is reported as not available.
"""

from __future__ import annotations

import asyncio
import importlib
import signal
import sys
from typing import Any

from .config import Config
from .gateway import Gateway


FRONTENDS: dict[str, str] = {
    "smtp": "avgate.frontends.smtp:start",
    "milter": "avgate.frontends.milter:start",
    "icap": "avgate.frontends.icap:start",
    "http": "avgate.frontends.http:start",
    "clamd_listener": "avgate.frontends.clamd:start",
}


def _say(line: str) -> None:
    print(line, flush=True)


async def serve(config: Config, stop: asyncio.Event | None = None) -> int:
    stop = stop or asyncio.Event()
    gateway = Gateway.from_config(config)
    await gateway.start()
    scanner = gateway.scanner
    engines = ", ".join(f"{e.name} ({e.type_name}, {e.version()})" for e in scanner.engines)
    _say(f"avgate: engines ready: {engines}")
    servers: list[Any] = []
    enabled = {"smtp": bool(config.smtp_listeners), "milter": config.milter is not None,
               "icap": config.icap is not None, "http": config.http is not None,
               "clamd_listener": config.clamd_listener is not None}
    for name, target in FRONTENDS.items():
        if not enabled[name]:
            continue
        module_name, _, func = target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            _say(f"avgate: {name}: front-end not available in this build")
            continue
        started = await getattr(module, func)(gateway)
        for srv in started:
            describe = getattr(srv, "describe", None)
            _say(f"avgate: {name}: listening on {describe() if describe else srv}")
        servers.extend(started)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    _say("avgate: serving; SIGTERM or Ctrl-C stops")
    await stop.wait()
    _say("avgate: stopping")
    for srv in servers:
        close = getattr(srv, "aclose", None)
        if close is not None:
            await close()
    await gateway.close()
    return 0


def run(config: Config) -> int:
    try:
        return asyncio.run(serve(config))
    except KeyboardInterrupt:
        return 0
    except Exception as exc:
        print(f"avgate: {exc}", file=sys.stderr)
        return 1
