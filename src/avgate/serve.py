"""``avgate serve``: runs the enabled front-ends in one event loop, reloads, drains.

Front-ends register in ``FRONTENDS`` (config section → "module:function"); each start
function is ``async def start(gateway: Gateway) -> list[Listener]``: it reads its own config
section from ``gateway.config`` and returns started listeners, objects with ``describe() ->
str`` (what it listens on) and ``async aclose()`` (stop accepting, finish in-flight work).
A front-end whose module does not exist yet is reported as not available.

Reload (SIGHUP, or the clamd listener's RELOAD command)
    The object a front-end's ``start`` receives is a :class:`GatewayRef`, not the Gateway
    itself. It behaves like a Gateway (every attribute read — ``process``, ``new_spool``,
    ``config``, ``scanner``, ``policy``, ``store``, ``log`` — goes to the *current* one), and a
    reload swaps in a new Gateway (new config, new ScanService with freshly loaded signatures,
    new Policy) without touching sockets or connections. So a front-end adopts reload by
    following one rule: **read ``gateway.<attr>`` per request/message, never keep
    ``gateway.scanner``/``gateway.policy``/``gateway.config.<section>`` from start-up.** A
    scan already running finishes on the Gateway it started on; a retired Gateway's engines
    are closed once its last scan has finished (or after ``[serve] drain_timeout``).
    ``gateway.current`` is the current Gateway; ``await gateway.request_reload()`` asks for
    a reload and returns whether it was applied (``getattr(gateway, "request_reload",
    None)`` is None when a front-end runs under a plain Gateway, e.g. in a unit test).
    A new config that does not load or validate, or whose engines fail to start (a broken
    signature file), is refused: the old Gateway stays, the reason goes to stderr and to
    the scan log as ``{"event": "reload", "ok": false, "error": ...}``. Listener addresses
    and which front-ends run are fixed at start-up: a reload that changes them is applied
    for everything else and says that those changes need a restart.

Drain (SIGTERM, SIGINT)
    Every listener's ``aclose()`` runs at once (each stops accepting, then waits for its
    in-flight work), bounded by ``[serve] drain_timeout`` (default 30 s); then the scans
    still counted by the GatewayRef get what is left of that deadline. A second signal
    during the drain stops waiting. Then the engines are closed.

Workers (``[serve] workers = N``, N > 1)
    ``run`` forks N worker processes before any event loop exists; each runs the whole
    ``serve`` (its own Gateway, engines, verdict cache) and binds the same TCP ports with
    SO_REUSEPORT, so the kernel spreads connections over them. The parent only supervises:
    it forwards SIGTERM/SIGINT/SIGHUP to every worker, restarts a worker that dies later
    than its start-up, and stops everything (exit status of the failed worker) when one fails
    while starting. Front-ends adopt this by binding with ``reuse_port(config)`` and by
    opening unix sockets only when ``serves_unix_sockets()`` (worker 0: a unix socket cannot
    be shared that way). Per-process state stays per process: ``/metrics`` shows the counters
    of the worker that answered, each worker has its own cache. A worker's clamd RELOAD asks
    the supervisor (SIGHUP to the parent), so every worker reloads. Listener addresses must
    name fixed ports: with port 0 every worker would get a different one.
"""

from __future__ import annotations

import asyncio
import errno
import importlib
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

from pydantic import Field

from . import config as config_mod
from .config import Config
from .errors import AvgateError, ConfigError
from .frontends.listen import Address, ListenError, ListenOptions
from .gateway import Gateway, Outcome
from .policy import Context
from .settings import Section
from .spool import Spool

if TYPE_CHECKING:
    from .observability import ScanLog
    from .policy import Policy
    from .quarantine import Store
    from .scan import ScanService

FRONTENDS: dict[str, str] = {
    "smtp": "avgate.frontends.smtp:start",
    "milter": "avgate.frontends.milter:start",
    "icap": "avgate.frontends.icap:start",
    "http": "avgate.frontends.http:start",
    "clamd_listener": "avgate.frontends.clamd:start",
    "http_proxy": "avgate.frontends.http_proxy:start",
    "pop3_proxy": "avgate.frontends.pop3:start",
    "imap_proxy": "avgate.frontends.imap:start",
    "ftp_proxy": "avgate.frontends.ftp:start",
}




class ServeSettings(Section):
    """``[serve]``: worker processes sharing the listeners, and the drain on SIGTERM/reload."""

    workers: int = Field(1, gt=0)
    drain_timeout: float = Field(30.0, gt=0)
    #: the event loop: uvloop (default: 13-22 % less CPU per message in the bench) or
    #: asyncio's own
    loop: Literal["asyncio", "uvloop"] = "uvloop"
#: start-up window: a worker that exits within it is a start-up failure (not restarted)
WORKER_STARTUP_S = 10.0

_worker_index: int | None = None  # set in worker processes (``[serve] workers`` > 1)


def listen_options(config: Config) -> ListenOptions:
    """What this process tells its front-ends: SO_REUSEPORT when several serve workers share
    the TCP ports, unix sockets only in worker 0 (they cannot be shared), the drain bound."""
    return ListenOptions(reuse_port=config.serve.workers > 1,
                         unix_sockets=_worker_index in (None, 0),
                         drain_timeout=config.serve.drain_timeout, base_dir=config.base_dir)


def _say(line: str) -> None:
    # one write per line: worker processes share stdout, and with PYTHONUNBUFFERED a
    # print() would write the text and its newline separately (lines could interleave)
    print(line + "\n", end="", flush=True)


def _warn(line: str) -> None:
    print(line + "\n", end="", file=sys.stderr, flush=True)


def exposure_warnings(config: Config) -> list[str]:
    """One loud line per listener bound beyond loopback with nobody authenticated.

    SMTP, milter, ICAP and the clamd protocol have no authentication of their own here: on
    a non-loopback address anyone who can reach the port can use avgate as a verdict oracle
    (or relay through the SMTP next hop). The HTTP API warns for itself (it has tokens).
    """
    found: list[tuple[str, Address]] = [("smtp", x.listen) for x in config.smtp_listeners]
    for name in ("milter", "icap", "clamd_listener"):
        section = getattr(config, name)
        if section is not None:
            found.append((name, section.listen))
    return [f"avgate: WARNING: {name} listens on {listen}, beyond loopback, with no "
            "authentication: anyone who can reach it can submit content and read verdicts; "
            "bind a loopback or unix address, or firewall it"
            for name, listen in found if not listen.is_loopback]


def mode_warnings(config: Config) -> list[str]:
    """One line per SMTP listener from a config file whose ``mode`` was not written.

    The default stays ``before_queue`` (the contract's proxy semantics: the client gets the
    policy's reply), but behind Postfix's ``content_filter`` a reject there makes Postfix
    bounce the virus to the (forged) sender. The listener cannot tell where it sits, so the
    admin must say: an unset mode is warned about at start and by ``config check``.
    """
    if config.source is None:
        return []
    return [f"avgate: WARNING: smtp listener {x.name!r} has no `mode`: assuming "
            "\"before_queue\" (rejects reach the client). Behind Postfix content_filter set "
            "mode = \"after_queue\" (a reject there bounces the virus to a forged sender); "
            "set mode = \"before_queue\" to silence this"
            for x in config.smtp_listeners if "mode" not in x.model_fields_set
            and x.next_hop != "discard"]


class GatewayRef:
    """The current Gateway, swappable at run time; what front-ends receive from ``serve``.

    Attribute reads are forwarded to :attr:`current`: the ones front-ends read per request
    (``config``, ``scanner``, ``policy``, ``log``, ``store``, ``log_outcome``) are
    properties, any other name goes through ``__getattr__``. :meth:`process` and
    :meth:`new_spool` are explicit so that in-flight scans are counted per Gateway.
    """

    def __init__(self, gateway: Gateway,
                 reload: Callable[[], Awaitable[bool]] | None = None) -> None:
        self.current = gateway
        self._reload = reload
        self._inflight: dict[int, int] = {}
        #: an Event per Gateway someone waits on (``wait_idle``), set when its count is 0
        self._idle: dict[int, asyncio.Event] = {}

    def __getattr__(self, name: str) -> Any:
        # only called for names GatewayRef itself lacks (the common ones are properties)
        if name == "current":  # not set yet (copy, pickle): no endless recursion
            raise AttributeError(name)
        return getattr(self.current, name)

    # the attributes front-ends read per request: no failed lookup before __getattr__
    @property
    def config(self) -> Config:
        return self.current.config

    @property
    def scanner(self) -> ScanService:
        return self.current.scanner

    @property
    def policy(self) -> Policy:
        return self.current.policy

    @property
    def log(self) -> ScanLog | None:
        return self.current.log

    @property
    def store(self) -> Store:
        return self.current.store

    @property
    def log_outcome(self) -> Callable[..., None]:
        """``Gateway.log_outcome`` of the current Gateway (its bound method: no second call
        with the protocol's keywords packed again)."""
        return self.current.log_outcome

    def new_spool(self) -> Spool:
        return self.current.new_spool()

    async def process(self, spool: Spool, ctx: Context, ids: dict[str, str] | None = None,
                      store_quarantine: bool = True, defer_log: bool = False) -> Outcome:
        """``Gateway.process`` on the current Gateway, counted for drain and retirement."""
        gw = self.current
        key = id(gw)
        inflight = self._inflight
        inflight[key] = inflight.get(key, 0) + 1
        try:
            return await gw.process(spool, ctx, ids, store_quarantine=store_quarantine,
                                    defer_log=defer_log)
        finally:
            left = inflight[key] = inflight[key] - 1
            if not left:
                idle = self._idle.get(key)
                if idle is not None:
                    idle.set()

    def inflight(self, gateway: Gateway | None = None) -> int:
        """Scans running now (on ``gateway``, or on any Gateway)."""
        if gateway is not None:
            return self._inflight.get(id(gateway), 0)
        return sum(self._inflight.values())

    async def wait_idle(self, gateway: Gateway) -> None:
        """Return once no scan runs on ``gateway``."""
        key = id(gateway)
        while self._inflight.get(key, 0):
            idle = self._idle.get(key)
            if idle is None or idle.is_set():  # set when the count last reached 0
                idle = self._idle[key] = asyncio.Event()
            await idle.wait()
        self._inflight.pop(key, None)
        self._idle.pop(key, None)

    def swap(self, gateway: Gateway) -> Gateway:
        """Make ``gateway`` current; return the previous one (still finishing its scans)."""
        old, self.current = self.current, gateway
        return old

    async def request_reload(self) -> bool:
        """Reload config and signatures (like SIGHUP); True when the new config is in use.

        In a worker process the supervisor is asked instead (it signals every worker), and
        the answer is True when the request was passed on."""
        if _worker_index is not None:
            os.kill(os.getppid(), signal.SIGHUP)
            return True
        if self._reload is None:
            return False
        return await self._reload()


def _listen_layout(config: Config) -> dict[str, Any]:
    """What only a restart can change: which front-ends run and where they listen."""
    def where(section: Any) -> Any:
        if section is None:
            return None
        return {k: getattr(section, k, None)
                for k in ("listen", "unix_socket", "tls_cert", "tls_key")}

    return {"smtp": [(x.name, str(x.listen)) for x in config.smtp_listeners],
            **{name: where(getattr(config, name))
               for name in config_mod.SINGLE_FRONTENDS}}


def _open_log(config: Config) -> Any:
    """The scan log of ``[log]`` (path relative to the config file), or None if unavailable."""
    try:
        from .observability import ScanLog
    except ImportError:  # pragma: no cover - observability is part of the package
        return None
    path = config.log.path
    if path:
        path = str(Path(config.base_dir, path))
    return ScanLog(path, config.log.level)


class Server:
    """One ``serve`` process: the GatewayRef, the listeners, reload and drain."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.drain_timeout = config.serve.drain_timeout
        self.log = _open_log(config)
        self.ref = GatewayRef(Gateway.from_config(config, log=self.log), self.reload)
        self.listeners: list[Any] = []
        self._reload_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._retired: list[Gateway] = []

    def _event(self, event: dict[str, Any]) -> None:
        if self.log is not None:
            self.log.log(event)

    async def start(self) -> None:
        """Start the engines, then every enabled front-end; print what listens where."""
        gateway = self.ref.current
        await gateway.start()
        engines = ", ".join(
            f"{e.name} ({e.type_name}, {e.version()}"
            + (f"; {e.describe_workers()}" if hasattr(e, "describe_workers") else "") + ")"
            for e in gateway.scanner.engines)
        _say(f"avgate: engines ready: {engines}")
        for line in exposure_warnings(self.config) + mode_warnings(self.config):
            _warn(line)
            self._event({"event": "warning", "warning": line.partition("WARNING: ")[2]})
        cfg = self.config
        enabled = {"smtp": bool(cfg.smtp_listeners),
                   **{name: getattr(cfg, name) is not None
                      for name in config_mod.SINGLE_FRONTENDS}}
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
            # front-ends are typed against Gateway; the ref forwards every attribute to it
            try:
                started = await getattr(module, func)(cast(Gateway, self.ref),
                                                      listen_options(cfg))
            except ListenError as exc:
                if cfg.source is not None or exc.__cause__ is None or getattr(
                        exc.__cause__, "errno", None) != errno.EADDRINUSE:
                    raise
                # Built-in defaults: a default port something else already uses (Squid on
                # 3128, a local clamd on 3311) costs only that front-end. A config file's
                # listener is what the admin asked for: failing to open it stops the start.
                line = (f"avgate: WARNING: {exc}; {name} not started (the other front-ends "
                        "run; give it another listen in a config file)")
                _warn(line)
                self._event({"event": "warning", "warning": line.partition("WARNING: ")[2]})
                continue
            for srv in started:
                describe = getattr(srv, "describe", None)
                _say(f"avgate: {name}: listening on {describe() if describe else srv}")
            self.listeners.extend(started)

    async def reload(self) -> bool:
        """Load the config file again and swap in a new Gateway; refuse a bad one."""
        async with self._reload_lock:
            started = time.perf_counter()
            source = self.config.source
            new_gw: Gateway | None = None
            try:
                new_cfg = config_mod.load(source) if source else config_mod.defaults()
                new_log = self.log
                if new_cfg.log != self.config.log:
                    new_log = _open_log(new_cfg)
                new_gw = Gateway.from_config(new_cfg, log=new_log)
                await new_gw.start()  # loads and compiles signatures: a bad file fails here
            except Exception as exc:
                reason = "; ".join(exc.problems) if isinstance(exc, ConfigError) else str(exc)
                _warn(f"avgate: reload refused, keeping the running config: {reason}")
                self._event({"event": "reload", "ok": False, "error": reason,
                             "config": source})
                if new_gw is not None:
                    await new_gw.close()
                return False
            if _listen_layout(new_cfg) != _listen_layout(self.config):
                _warn("avgate: reload: listener addresses or enabled front-ends changed; "
                      "those changes need a restart (everything else is applied)")
            old_log = self.log
            old = self.ref.swap(new_gw)
            self.config, self.log = new_cfg, new_log
            self._spawn(self._retire(old, old_log if old_log is not new_log else None))
            engines = ", ".join(f"{e.name}={e.db_version()}" for e in new_gw.scanner.engines)
            _say(f"avgate: reloaded {source or 'built-in defaults'} ({engines})")
            self._event({"event": "reload", "ok": True, "config": source,
                         "db_versions": new_gw.scanner.db_versions(),
                         "elapsed_ms": round((time.perf_counter() - started) * 1000, 3)})
            return True

    async def _retire(self, gateway: Gateway, log: Any) -> None:
        """Close a swapped-out Gateway once its scans are done (bounded by drain_timeout)."""
        self._retired.append(gateway)
        try:
            await asyncio.wait_for(self.ref.wait_idle(gateway), self.drain_timeout)
        except TimeoutError:
            _warn(f"avgate: reload: {self.ref.inflight(gateway)} scans still running on the "
                  "old configuration after drain_timeout; closing its engines")
        await gateway.close()
        # Gateway.close does not close a quarantine store it opened (no public hook):
        # close it here so that reloads do not pile up SQLite connections
        store = getattr(gateway, "_store", None)
        if store is not None and store is not getattr(self.ref.current, "_store", None):
            store.close()
        self._retired.remove(gateway)
        if log is not None:
            log.close()

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self, force: asyncio.Event) -> None:
        """Stop accepting everywhere, let in-flight work finish up to the deadline."""
        deadline = time.monotonic() + self.drain_timeout
        _say(f"avgate: stopping: no new connections; waiting up to {self.drain_timeout:g}s "
             f"for {self.ref.inflight()} scans in flight")

        async def closing() -> None:
            await asyncio.gather(*(srv.aclose() for srv in self.listeners
                                   if hasattr(srv, "aclose")), return_exceptions=True)
            for gw in [self.ref.current, *self._retired]:
                await self.ref.wait_idle(gw)

        work = asyncio.ensure_future(closing())
        forced = asyncio.ensure_future(force.wait())
        await asyncio.wait({work, forced}, timeout=max(0.0, deadline - time.monotonic()),
                           return_when=asyncio.FIRST_COMPLETED)
        forced.cancel()
        if not work.done():
            left = self.ref.inflight()
            _warn(f"avgate: drain ended with {left} scans unfinished "
                  f"({'second signal' if force.is_set() else 'drain_timeout'})")
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for gw in [self.ref.current, *self._retired]:
            await gw.close()
        if self.log is not None:
            self.log.close()


async def serve(config: Config, stop: asyncio.Event | None = None) -> int:
    """Run every enabled front-end until ``stop`` is set or SIGTERM/SIGINT; SIGHUP reloads."""
    stop = stop or asyncio.Event()
    force = asyncio.Event()
    server = Server(config)
    loop = asyncio.get_running_loop()

    def on_stop() -> None:
        if stop.is_set():
            force.set()  # a second signal: stop waiting for the drain
        stop.set()

    def on_hup() -> None:
        server._spawn(server.reload())

    try:
        await server.start()
    except BaseException:
        await asyncio.gather(*(srv.aclose() for srv in server.listeners),
                             return_exceptions=True)
        await server.close()
        raise
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    _say("avgate: serving; SIGHUP reloads, SIGTERM or Ctrl-C stops")
    try:
        await stop.wait()
        await server.drain(force)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        await server.close()
    _say("avgate: stopped")
    return 0


def run(config: Config) -> int:
    """``avgate serve``: one process, or a supervisor of ``[serve] workers`` processes."""
    workers = config.serve.workers
    if workers > 1:
        return _supervise(config, workers)
    return _run_one(config)


def _loop_factory(config: Config) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """``[serve] loop``: None for asyncio's own loop, else uvloop's (an error when missing)."""
    if config.serve.loop != "uvloop":
        return None
    try:
        import uvloop
    except ImportError:
        raise AvgateError('[serve] loop = "uvloop" (the default) needs the uvloop package, '
                          "a dependency of avgate (reinstall avgate, or set [serve] loop = "
                          '"asyncio")') from None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def _run_one(config: Config) -> int:
    try:
        with asyncio.Runner(loop_factory=_loop_factory(config)) as runner:
            return runner.run(serve(config))
    except KeyboardInterrupt:
        return 0
    except ConfigError as exc:
        for line in exc.problems:
            print(f"avgate: config error: {line}", file=sys.stderr)
        return 2
    except (AvgateError, OSError) as exc:
        print(f"avgate: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # a front-end's unexpected start-up failure
        print(f"avgate: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def _supervise(config: Config, workers: int) -> int:
    """Fork ``workers`` serve processes and look after them (see the module docstring)."""
    global _worker_index
    children: dict[int, int] = {}  # pid → worker index
    stopping = False
    exit_code = 0

    def spawn(index: int) -> None:
        global _worker_index
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the worker
            _worker_index = index
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)  # serve() installs its own handlers
            code = 1
            try:
                code = _run_one(config)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children[pid] = index

    def forward(sig: int, _frame: object) -> None:
        nonlocal stopping
        if sig in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for pid in list(children):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    started = time.monotonic()
    for index in range(workers):
        spawn(index)
    _say(f"avgate: supervisor {os.getpid()}: {workers} workers "
         f"({', '.join(map(str, children))}) sharing the listeners (SO_REUSEPORT)")
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        index = children.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        if stopping:
            exit_code = exit_code or (code if code > 0 else 0)
            continue
        if time.monotonic() - started < WORKER_STARTUP_S:
            _warn(f"avgate: worker {index} (pid {pid}) failed while starting (exit {code}); "
                  "stopping the others")
            exit_code = code if code > 0 else 1
            forward(signal.SIGTERM, None)
            continue
        _warn(f"avgate: worker {index} (pid {pid}) exited with {code}; restarting it")
        time.sleep(0.5)  # no tight loop if it keeps dying
        spawn(index)
    _worker_index = None
    return exit_code
