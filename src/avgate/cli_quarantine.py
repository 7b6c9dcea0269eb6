"""``avgate quarantine ...``: list, show, export, release, delete, purge, report, migrate, copy.

Exit codes: 0 ok, 1 not found or refused (e.g. a second release without ``--force``),
2 error (bad config, store or SMTP failure, an invalid ``--to`` address).

Everything printed in text mode goes through :func:`safe`: envelope fields, file names and
virus names come from whoever sent the object, and a terminal must never receive their
control characters (ESC starts colour, title and clear-screen sequences). ``--json`` output
is escaped by the JSON encoder (ASCII only).
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer

from . import config as config_mod
from .errors import AvgateError, ConfigError, NotFound
from .quarantine import AlreadyReleased, RecordFilter, Store, iso_utc, open_store, release, report

quarantine_app = typer.Typer(no_args_is_help=True,
                             help="Inspect, release and purge the quarantine.")

ConfigOpt = Annotated[str | None, typer.Option("--config", "-c", help="Config file (TOML).")]
IdArg = Annotated[str, typer.Argument(help="Quarantine id (see `avgate quarantine list`).")]

EXIT_OK, EXIT_REFUSED, EXIT_ERROR = 0, 1, 2

# C0 controls, DEL, C1 controls; the bidi and line/paragraph separators that reorder or
# break a line on screen; lone surrogates (not encodable)
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e"
                     r"\u2066-\u2069\ud800-\udfff]")


def _escape(m: re.Match[str]) -> str:
    code = ord(m.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe(text: object) -> str:
    """``text`` with every control character shown as an escape (``\\x1b``, ``\\u202e``)."""
    return _UNSAFE.sub(_escape, str(text))


def _echo(text: str, err: bool = False) -> None:
    """One line of text-mode output, made safe for a terminal."""
    typer.echo(safe(text), err=err)


def config_path(path: str | None, ctx: typer.Context | None) -> str | None:
    """``--config`` as given to this subcommand, else to the nearest command group above it:
    ``avgate --config X quarantine list``, ``avgate quarantine --config X list`` and
    ``avgate quarantine list --config X`` all mean the same (the innermost one wins)."""
    node: Any = ctx  # a typer (click) Context; its parents are click's own type
    while path is None and node is not None:
        path = node.params.get("config")
        node = node.parent
    return path


def load_config(path: str | None, ctx: typer.Context | None = None) -> config_mod.Config:
    """The config, or exit 2 with every problem on stderr (shared by every subcommand);
    ``ctx``: a ``--config`` given to a command group counts too (:func:`config_path`)."""
    try:
        return config_mod.load(config_path(path, ctx))
    except ConfigError as exc:
        for line in exc.problems:
            _echo(f"config error: {line}", err=True)
        raise typer.Exit(EXIT_ERROR) from None


@quarantine_app.callback()
def _group(config: ConfigOpt = None) -> None:
    # `avgate quarantine --config X list`: the subcommands read it through config_path
    pass


@contextmanager
def _store(cfg: config_mod.Config) -> Iterator[Store]:
    """Open the configured store (``[quarantine] backend``); translate the error tree into
    exit codes in one place."""
    try:
        store = open_store(cfg, maildir=False)
    except AvgateError as exc:
        _echo(f"avgate: {exc}", err=True)
        raise typer.Exit(EXIT_ERROR) from None
    try:
        yield store
    except (NotFound, AlreadyReleased) as exc:
        _echo(f"avgate: {exc}", err=True)
        raise typer.Exit(EXIT_REFUSED) from None
    except AvgateError as exc:
        _echo(f"avgate: {exc}", err=True)
        raise typer.Exit(EXIT_ERROR) from None
    finally:
        store.close()


def _only(flag: str, what: str) -> Any:
    """A ``quarantine list`` filter option (see :class:`~avgate.quarantine.RecordFilter`)."""
    return typer.Option(flag, help=f"Only records {what}.")


@quarantine_app.command("list")
def list_(ctx: typer.Context, config: ConfigOpt = None,
          json_out: Annotated[bool, typer.Option("--json", help="JSON Lines.")] = False,
          virus: Annotated[str | None, _only("--virus", "with a finding matching this glob")
                           ] = None,
          since: Annotated[str | None, _only(
              "--since", "quarantined after TIME (ISO 8601, @EPOCH, 3d)")] = None,
          sender: Annotated[str | None, _only("--sender", "whose sender matches this glob")
                            ] = None,
          recipient: Annotated[str | None, _only(
              "--recipient", "with a recipient matching this glob")] = None,
          status: Annotated[str | None, _only(
              "--status", "with this scan status (infected, skipped...)")] = None,
          frontend: Annotated[str | None, _only(
              "--frontend", "from this front-end (smtp, milter, http...)")] = None,
          refid: Annotated[str | None, _only(
              "--refid", "of the message with this RefID (X-Avgate-RefID, reply text)")
                           ] = None,
          until: Annotated[str | None, _only(
              "--until", "quarantined before TIME (as --since; with it, a date range)")
                           ] = None,
          listener: Annotated[str | None, _only(
              "--listener", "received by a listener whose name matches this glob")] = None,
          subject: Annotated[str | None, _only(
              "--subject", "whose subject contains this text (any case; no wildcards)")
                             ] = None) -> None:
    """List quarantined objects, oldest first."""
    from .ondemand import parse_since

    cfg = load_config(config, ctx)
    times: dict[str, float | None] = {}
    for flag, value in (("--since", since), ("--until", until)):
        try:
            times[flag] = parse_since(value) if value is not None else None
        except ValueError as exc:
            _echo(f"avgate: {flag}: {exc}", err=True)
            raise typer.Exit(EXIT_ERROR) from None
    where = RecordFilter(virus=virus, sender=sender, recipient=recipient, status=status,
                         frontend=frontend, since=times["--since"], refid=refid,
                         listener=listener, until=times["--until"], subject=subject)
    with _store(cfg) as store:
        records = store.list(where)
        for rec in records:
            if json_out:
                d = rec.to_dict()
                d.pop("result")
                typer.echo(json.dumps(d))
            else:
                released = " released" if rec.released is not None else ""
                _echo(f"{rec.id}  {rec.refid or '-':<16}  {iso_utc(rec.created)[:19]}Z  "
                      f"{rec.size:>9}  "
                      f"{rec.status:<8} {','.join(rec.viruses) or '-'}  "
                      f"{rec.envelope.sender or '<>'} -> "
                      f"{','.join(rec.envelope.recipients) or '-'}{released}"
                      + (f"  {rec.subject}" if rec.subject else ""))
        if not json_out:
            _echo(f"{len(records)} record(s)", err=True)


@quarantine_app.command()
def show(ctx: typer.Context, record_id: IdArg, config: ConfigOpt = None,
         json_out: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Metadata of one record and a summary of its parts."""
    cfg = load_config(config, ctx)
    with _store(cfg) as store:
        rec = store.get(record_id)
        parts = _parts(store.read_raw(record_id), cfg)
        if json_out:
            typer.echo(json.dumps({**rec.to_dict(), "parts": parts}))
            return
        d = rec.to_dict()
        for key in ("id", "refid", "created", "frontend", "listener", "source", "client_addr",
                    "helo", "sender", "subject"):
            _echo(f"{key + ':':<13} {d[key] or '-'}")
        _echo(f"{'recipients:':<13} {', '.join(rec.envelope.recipients) or '-'}")
        _echo(f"{'status:':<13} {rec.status}")
        for f in rec.result.get("findings", []):
            _echo(f"{'finding:':<13} {f['name']} ({f['engine']}) in "
                       f"{f['part'] or '(whole object)'}")
        engines = ", ".join(f"{e['name']} {e['version']}" for e in rec.result.get("engines", []))
        _echo(f"{'engines:':<13} {engines or '-'}")
        _echo(f"{'rule:':<13} {rec.rule or '-'}")
        _echo(f"{'actions:':<13} {', '.join(rec.actions) or '-'}")
        _echo(f"{'size:':<13} {rec.size}")
        _echo(f"{'sha256:':<13} {rec.sha256}")
        _echo(f"{'released:':<13} {d['released'] or 'no'}"
                   + (f" to {', '.join(rec.released_to)}" if rec.released_to else ""))
        _echo("parts:")
        for p in parts:
            extra = f"{p['size']} bytes" if "size" in p else f"{p['status']}: {p['reason']}"
            _echo(f"  {p['path'] or '(message)'}  {extra}")


def _parts(data: bytes, cfg: config_mod.Config) -> list[dict[str, object]]:
    """The decomposition of a record, as avgate.content sees it (paths match findings)."""
    try:
        from .content import Part, decompose
    except ImportError:
        return []
    out: list[dict[str, object]] = []
    try:
        for item in decompose(data, cfg.limits, name=""):
            if isinstance(item, Part):
                out.append({"path": item.path, "size": len(item.data), "depth": item.depth})
            else:
                out.append({"path": item.path, "status": item.status.value,
                            "reason": item.reason})
    except Exception as exc:  # a summary only: a parser problem must not hide the metadata
        out.append({"path": "", "status": "error", "reason": str(exc)})
    return out


@quarantine_app.command()
def export(ctx: typer.Context, record_id: IdArg, config: ConfigOpt = None) -> None:
    """Write the object, byte-for-byte, to stdout (``> file.eml``)."""
    cfg = load_config(config, ctx)
    with _store(cfg) as store, store.open_raw(record_id) as f:
        out = sys.stdout.buffer
        while chunk := f.read(1 << 16):
            out.write(chunk)
        out.flush()


@quarantine_app.command("release")
def release_(ctx: typer.Context, record_id: IdArg, config: ConfigOpt = None,
             to: Annotated[list[str] | None, typer.Option(
                 "--to", help="Send to this address instead of the original recipients "
                              "(repeatable).")] = None,
             force: Annotated[bool, typer.Option(
                 "--force", help="Release even if it was released before.")] = False) -> None:
    """Re-inject the object over SMTP to [quarantine] next_hop with its original envelope."""
    cfg = load_config(config, ctx)
    next_hop = cfg.quarantine.next_hop
    with _store(cfg) as store:
        rec = asyncio.run(release(store, record_id, next_hop, to=to or None, force=force))
        _echo(f"{rec.id}: released to {', '.join(rec.released_to)} via {next_hop}")


@quarantine_app.command()
def delete(ctx: typer.Context, record_id: IdArg, config: ConfigOpt = None) -> None:
    """Delete one record and its content."""
    cfg = load_config(config, ctx)
    with _store(cfg) as store:
        store.delete(record_id)
        _echo(f"{record_id}: deleted")


@quarantine_app.command()
def purge(ctx: typer.Context,
          older_than: Annotated[float, typer.Option(
              "--older-than", min=0, help="Delete records older than DAYS.")],
          config: ConfigOpt = None) -> None:
    """Delete every record quarantined more than DAYS days ago."""
    cfg = load_config(config, ctx)
    with _store(cfg) as store:
        ids = store.purge(older_than)
        _echo(f"purged {len(ids)} record(s)")


@quarantine_app.command("report")
def report_(ctx: typer.Context, record_id: IdArg, config: ConfigOpt = None,
            false_positive: Annotated[bool, typer.Option("--false-positive")] = False,
            false_negative: Annotated[bool, typer.Option("--false-negative")] = False) -> None:
    """Send the object (attached as message/rfc822) to [quarantine] report_to."""
    if false_positive == false_negative:
        _echo("avgate: give exactly one of --false-positive, --false-negative", err=True)
        raise typer.Exit(EXIT_ERROR)
    cfg = load_config(config, ctx)
    settings = cfg.quarantine
    kind = "false-positive" if false_positive else "false-negative"
    report_to = settings.report_address(kind)  # report_fp_to / report_fn_to, else report_to
    if not report_to:
        key = "report_fp_to" if false_positive else "report_fn_to"
        _echo(f"avgate: [quarantine] {key} (or report_to) is not configured", err=True)
        raise typer.Exit(EXIT_ERROR)
    with _store(cfg) as store:
        asyncio.run(report(store, record_id, kind, settings.next_hop, settings.report_from,
                           report_to))
        _echo(f"{record_id}: {kind} report sent to {report_to}")


@quarantine_app.command()
def migrate(ctx: typer.Context, config: ConfigOpt = None) -> None:
    """Create or update the store's schema (PostgreSQL: run once, before the gateways)."""
    cfg = load_config(config, ctx)
    settings = cfg.quarantine
    try:
        if settings.backend == "postgresql":
            from .quarantine.postgres import SCHEMA_VERSION
            from .quarantine.postgres import migrate as pg_migrate

            applied = pg_migrate(settings.dsn)
            done = (f"applied schema version(s) {', '.join(map(str, applied))}" if applied
                    else "schema is current")
            _echo(f"quarantine database: {done} (version {SCHEMA_VERSION})")
        else:
            open_store(cfg, maildir=False).close()  # the file store migrates when opened
            _echo(f"quarantine {cfg.quarantine_path}: schema is current")
    except AvgateError as exc:
        _echo(f"avgate: {exc}", err=True)
        raise typer.Exit(EXIT_ERROR) from None


@quarantine_app.command()
def copy(ctx: typer.Context, config: ConfigOpt = None,
         source: Annotated[str | None, typer.Option(
             "--from", help="File store directory (default: [quarantine] path).")] = None,
         target: Annotated[str | None, typer.Option(
             "--to", help="PostgreSQL DSN (default: [quarantine] dsn).")] = None) -> None:
    """Copy every record of a file store into PostgreSQL (ids, times and release state
    kept; records already there are skipped, so a second run resumes the first)."""
    from pathlib import Path

    from .quarantine import QuarantineStore
    from .quarantine.postgres import PostgresStore
    from .quarantine.postgres import migrate as pg_migrate

    cfg = load_config(config, ctx)
    src_path = str(Path(source).absolute()) if source else cfg.quarantine_path
    dsn = target or cfg.quarantine.dsn
    if not dsn:
        _echo("avgate: give --to DSN (or set [quarantine] dsn)", err=True)
        raise typer.Exit(EXIT_ERROR)
    if not Path(src_path, "index.sqlite3").is_file():
        _echo(f"avgate: {src_path} is not a quarantine file store", err=True)
        raise typer.Exit(EXIT_ERROR)
    copied = skipped = 0
    try:
        pg_migrate(dsn)
        with QuarantineStore(src_path) as src, PostgresStore(dsn, pool_size=2) as dst:
            for rid in src.ids():
                if dst.adopt(src.get(rid), src.iter_raw(rid)):
                    copied += 1
                else:
                    skipped += 1
    except AvgateError as exc:
        _echo(f"avgate: {exc} (after {copied} copied)", err=True)
        raise typer.Exit(EXIT_ERROR) from None
    _echo(f"copied {copied} record(s), {skipped} already there")


__all__ = ["ConfigOpt", "config_path", "load_config", "quarantine_app", "safe"]
