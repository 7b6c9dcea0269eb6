"""avgate's clamd listener in this very process (an event loop in a thread), for tests that
look inside: the process's descriptor table, listener state, the gateway's engines."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar, cast

from avgate import config
from avgate.frontends import clamd as fe
from avgate.frontends.listen import ListenOptions
from avgate.gateway import Gateway

T = TypeVar("T")


class ReloadCounter:
    """A Gateway stand-in with ``request_reload`` (like serve's GatewayRef) that counts."""

    def __init__(self, gateway: Gateway, duration: float = 0.2) -> None:
        self.current = gateway
        self.duration = duration
        self.reloads = 0

    def __getattr__(self, name: str) -> Any:
        if name == "current":
            raise AttributeError(name)
        return getattr(self.current, name)

    async def request_reload(self) -> bool:
        self.reloads += 1
        await asyncio.sleep(self.duration)
        return True


class InProcessClamd:
    """``[clamd_listener]`` on 127.0.0.1:0 and ``root/clamd.sock``; ``settings`` go into the
    config as given (sections → tables)."""

    def __init__(self, root: Path, listener: dict[str, Any] | None = None,
                 reload_counter: bool = False, **sections: Any) -> None:
        self.root = root
        self.unix_path = str(root / "clamd.sock")
        raw: dict[str, Any] = {
            "scan": {"cache": False},
            "quarantine": {"path": str(root / "q")},
            "clamd_listener": {"listen": "127.0.0.1:0", "unix_socket": self.unix_path,
                               **(listener or {})},
        }
        raw.update(sections)
        self.cfg = config.from_dict(raw)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.gateway = Gateway.from_config(self.cfg)
        self.ref: Gateway | ReloadCounter = (ReloadCounter(self.gateway) if reload_counter
                                             else self.gateway)
        self.listeners: list[fe.ClamdListener] = self.call(self._start())
        self.port = self.listeners[0].port

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self) -> list[fe.ClamdListener]:
        await self.gateway.start()
        started = await fe.start(cast(Gateway, self.ref), ListenOptions(base_dir=self.cfg.base_dir))
        return cast(list[fe.ClamdListener], started)

    async def _stop(self) -> None:
        for listener in self.listeners:
            await listener.aclose()
        await self.gateway.close()

    def connections(self) -> int:
        """Client connections the listeners hold now."""
        async def count() -> int:
            return sum(len(x._conns) for x in self.listeners)
        return self.call(count())

    def connect(self, unix: bool = False, timeout: float = 10) -> socket.socket:
        if unix:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(self.unix_path)
        else:
            s = socket.create_connection(("127.0.0.1", self.port))
        s.settimeout(timeout)
        return s

    def talk(self, data: bytes, unix: bool = False) -> bytes:
        """Send ``data``, half-close, read until the server closes."""
        with self.connect(unix) as s:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            out = b""
            while chunk := s.recv(65536):
                out += chunk
        return out

    def close(self) -> None:
        self.call(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def open_fds() -> int:
    """Descriptors open in this process now."""
    return len(os.listdir("/proc/self/fd"))
