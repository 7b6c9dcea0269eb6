"""The ``avgate`` console script."""

from __future__ import annotations

import asyncio
import io
import json
import sys
import zipfile
from email.message import EmailMessage
from pathlib import Path
from typing import Annotated

import typer

from . import __version__
from . import config as config_mod
from .cli_quarantine import load_config as _load_config
from .cli_quarantine import quarantine_app
from .errors import AvgateError, ConfigError
from .result import ScanStatus

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="avgate: antivirus content-scanning gateway.")
config_app = typer.Typer(no_args_is_help=True, help="Show or check the configuration.")
app.add_typer(config_app, name="config")
app.add_typer(quarantine_app, name="quarantine")

ConfigOpt = Annotated[str | None, typer.Option("--config", "-c", help="Config file (TOML).",
                                               envvar=None)]

EICAR = (b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*")


def _out(line: str) -> None:
    sys.stdout.write(line + "\n")


@app.command()
def scan(
    paths: Annotated[list[str], typer.Argument(
        help="Files, directories, Maildirs, mbox files, or - for stdin.")],
    config: ConfigOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per object.")] = False,
    jobs: Annotated[int, typer.Option("--jobs", "-j", min=1, max=256,
                                      help="Objects scanned in parallel.")] = 4,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No summary.")] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress")] = False,
    since: Annotated[str | None, typer.Option(
        "--since", help="Only objects modified after TIME (ISO 8601, @EPOCH, 2h, 3d).")] = None,
    state: Annotated[str | None, typer.Option(
        "--state", help="File remembering when the last run started (next run's --since).")
    ] = None,
    action: Annotated[str, typer.Option(
        "--action", help="What to do with infected objects: report, delete, quarantine.")
    ] = "report",
) -> None:
    """Scan files, directories, Maildirs, mbox files or stdin; exit 0 clean, 1 infected,
    2 error (like clamscan)."""
    import time

    from .ondemand import (
        ACTIONS,
        ActionOutcome,
        Actions,
        Summary,
        format_time,
        iter_targets,
        parse_since,
        read_state,
        scan_targets,
        write_state,
    )
    from .scan import ScanService

    cfg = _load_config(config)
    if action not in ACTIONS:
        typer.echo(f"avgate: --action must be one of {', '.join(ACTIONS)}", err=True)
        raise typer.Exit(2)
    run_started = time.time()  # before anything is read: the next run's --since
    since_ts: float | None = None
    try:
        if since is not None:
            since_ts = parse_since(since, now=run_started)
        elif state is not None:
            since_ts = read_state(state)
    except (ValueError, OSError) as exc:
        typer.echo(f"avgate: {exc}", err=True)
        raise typer.Exit(2) from None
    store = None
    if action == "quarantine":
        from .quarantine import QuarantineStore

        try:
            store = QuarantineStore(cfg.quarantine_path)
        except AvgateError as exc:
            typer.echo(f"avgate: {exc}", err=True)
            raise typer.Exit(2) from None
    actions = Actions(action, store)
    summary = Summary()

    def on_error(path: str, reason: str) -> None:
        summary.errors += 1
        if json_out:
            _out(json.dumps({"path": path, "status": "error", "reason": reason}))
        else:
            _out(f"{path}: {reason} ERROR")

    def report(label: str, result_dict: dict[str, object], status: ScanStatus,
               virus: str, reason: str) -> None:
        if json_out:
            _out(json.dumps({"path": label, **result_dict}))
        elif status is ScanStatus.INFECTED:
            _out(f"{label}: {virus} FOUND")
        elif status is ScanStatus.ERROR:
            _out(f"{label}: {reason} ERROR")

    def report_action(outcome: ActionOutcome) -> None:
        if outcome.action == "error":
            summary.errors += 1
        elif outcome.action == "deleted":
            summary.deleted += 1
        else:
            summary.quarantined += 1
        if json_out:
            _out(json.dumps({"path": outcome.label, "action": outcome.action,
                             "detail": outcome.detail}))
        elif outcome.action == "deleted":
            _out(f"{outcome.label}: Removed.")
        elif outcome.action == "quarantined":
            _out(f"{outcome.label}: moved to quarantine {outcome.detail}")
        else:
            _out(f"{outcome.label}: {action} failed: {outcome.detail} ERROR")

    show_progress = (not json_out and not no_progress and sys.stderr.isatty()
                     and any(Path(p).is_dir() for p in paths if p != "-"))

    async def run() -> None:
        try:
            service = ScanService.from_config(cfg)
            await service.start()
        except AvgateError as exc:
            typer.echo(f"avgate: cannot start engines: {exc}", err=True)
            raise typer.Exit(2) from None
        progress = None
        task = None
        if show_progress:
            from rich.progress import Progress, SpinnerColumn, TextColumn

            progress = Progress(SpinnerColumn(), TextColumn("{task.description}"),
                                TextColumn("{task.completed} scanned"), transient=True)
            progress.start()
            task = progress.add_task("scanning", total=None)
        try:
            targets = iter_targets(paths, summary, on_error, since=since_ts)
            async for target, result in scan_targets(service, targets, jobs=jobs):
                summary.add(result)
                report(target.label, result.to_dict(), result.status, result.virus,
                       result.reason)
                outcome = actions.handle(target, result)
                if outcome is not None:
                    report_action(outcome)
                if progress is not None and task is not None:
                    progress.update(task, advance=1, description=target.label[-60:])
            for outcome in actions.finish():
                report_action(outcome)
        finally:
            if progress is not None:
                progress.stop()
            engines = ", ".join(f"{e.name} {e.version()}" for e in service.engines)
            await service.close()
            if store is not None:
                store.close()
        if not quiet and not json_out:
            s = summary
            _out("")
            _out("----------- SCAN SUMMARY -----------")
            _out(f"Engines: {engines}")
            _out(f"Scanned directories: {s.directories}")
            _out(f"Scanned files: {s.scanned}")
            _out(f"Infected files: {s.infected}")
            _out(f"Skipped files: {s.skipped}")
            _out(f"Unknown files: {s.unknown}")
            _out(f"Errors: {s.errors}")
            if since_ts is not None:
                _out(f"Not modified since {format_time(since_ts)}: {s.not_modified}")
            if action != "report":
                _out(f"Quarantined: {s.quarantined}" if action == "quarantine"
                     else f"Deleted: {s.deleted}")
            _out(f"Data scanned: {s.bytes / 1e6:.2f} MB")
            _out(f"Time: {s.elapsed:.3f} sec")
        elif json_out and not quiet:
            # stdout stays one object per scanned object; the summary goes to stderr
            typer.echo(json.dumps({"summary": summary.to_dict(),
                                   "next_since": format_time(run_started)}), err=True)
        if state is not None:
            # objects that failed to scan must be looked at again: keep the old state then
            if summary.errors == 0:
                write_state(state, run_started)
            else:
                typer.echo(f"avgate: errors: {state} not advanced", err=True)
        if not json_out and not quiet:
            _out(f"Next --since: {format_time(run_started)}")

    asyncio.run(run())
    raise typer.Exit(summary.exit_code())


def _selftest_samples() -> list[tuple[str, bytes]]:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("eicar.com", EICAR)
    msg = EmailMessage()
    msg["From"] = "selftest@avgate.invalid"
    msg["To"] = "postmaster@avgate.invalid"
    msg["Subject"] = "avgate selftest"
    msg.set_content("EICAR test attachment follows.\n")
    msg.add_attachment(EICAR, maintype="application", subtype="octet-stream",
                       filename="eicar.com")
    return [("eicar plain", EICAR), ("eicar zipped", buf.getvalue()),
            ("eicar base64 in MIME", msg.as_bytes())]


@app.command()
def selftest(config: ConfigOpt = None) -> None:
    """Send EICAR (plain, zipped, base64 in MIME) through every configured engine."""
    from .scan import ScanService
    from .spool import Spool

    cfg = _load_config(config)

    async def run() -> int:
        failures = 0
        service = ScanService.from_config(cfg)
        try:
            await service.start()
        except AvgateError as exc:
            _out(f"FAIL engines did not start: {exc}")
            return 1
        samples = [*_selftest_samples(), ("clean text", b"avgate selftest: clean\n")]
        try:
            for engine in service.engines:
                for label, data in samples:
                    with Spool.from_bytes(data) as spool:
                        r = await engine.scan(spool)
                    want = ScanStatus.CLEAN if label.startswith("clean") else ScanStatus.INFECTED
                    ok = r.status is want
                    failures += not ok
                    what = r.virus or r.reason or r.status.value
                    _out(f"{'ok  ' if ok else 'FAIL'} {engine.name:<12} {label:<22} "
                         f"{r.status.value} {what}")
        finally:
            await service.close()
        _out(f"selftest: {'passed' if not failures else f'{failures} check(s) failed'}")
        return 1 if failures else 0

    raise typer.Exit(asyncio.run(run()))


@config_app.command("show")
def config_show(config: ConfigOpt = None,
                json_out: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Print the effective configuration."""
    cfg = _load_config(config)
    data = cfg.to_dict()
    if json_out:
        _out(json.dumps(data, indent=2))
    else:
        _out(f"# effective config (source: {cfg.source or 'built-in defaults'})")
        _out(config_mod.render_toml(data))


@config_app.command("check")
def config_check(file: Annotated[str | None, typer.Argument(help="Config file.")] = None,
                 config: ConfigOpt = None) -> None:
    """Validate a config file; exit 0 when valid, 1 with the reasons otherwise."""
    path = file or config_mod.resolve_path(config)
    if path is None:
        _out("no config file given: the built-in defaults are valid")
        raise typer.Exit(0)
    try:
        config_mod.load(path)
    except ConfigError as exc:
        for line in exc.problems:
            _out(line)
        raise typer.Exit(1) from None
    _out(f"{path}: OK")


@app.command()
def serve(config: ConfigOpt = None) -> None:
    """Run the enabled front-ends."""
    from .serve import run

    cfg = _load_config(config)
    raise typer.Exit(run(cfg))


@app.command("qmail-queue")
def qmail_queue(config: ConfigOpt = None) -> None:
    """Drop-in for qmail-queue (QMAILQUEUE): message on fd 0, envelope on fd 1."""
    from .frontends.qmail import qmail_queue_command

    raise typer.Exit(qmail_queue_command(config))


@app.command()
def version() -> None:
    """Print the avgate version."""
    _out(f"avgate {__version__}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
