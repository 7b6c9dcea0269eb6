"""The ``avgate`` console script."""

from __future__ import annotations

import asyncio
import io
import json
import sys
import zipfile
from email.message import EmailMessage
from pathlib import Path
from typing import Annotated, Any

import typer

from . import __version__
from . import config as config_mod
from .cli_notify import notify_app
from .cli_quarantine import ConfigOpt, config_path, quarantine_app, safe
from .cli_quarantine import load_config as _load_config
from .errors import AvgateError, ConfigError
from .reports import report_cli
from .result import ScanStatus

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="avgate: antivirus content-scanning gateway.")
config_app = typer.Typer(no_args_is_help=True, help="Show or check the configuration.")
app.add_typer(config_app, name="config")
app.add_typer(quarantine_app, name="quarantine")
app.add_typer(notify_app, name="notify")  # avgate notify digest
app.command("report")(report_cli)  # avgate report --false-positive|--false-negative FILE


# `--config` is accepted at every level, as users type it: `avgate --config X quarantine list`,
# `avgate quarantine --config X list`, `avgate quarantine list --config X` (the innermost wins;
# see cli_quarantine.config_path)
@app.callback()
def _main(config: ConfigOpt = None) -> None:
    pass


@config_app.callback()
def _config_group(config: ConfigOpt = None) -> None:
    pass

EICAR = (b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*")


def _out(line: str) -> None:
    sys.stdout.write(line + "\n")


def _say(line: str) -> None:
    """A text-mode line naming a scanned object: file names, archive member names and reasons
    come from whoever made the object, so control characters are shown escaped."""
    _out(safe(line))


@app.command()
def scan(
    ctx: typer.Context,
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
    cluster: Annotated[str | None, typer.Option(
        "--cluster", help="Scan on a Dask cluster (tcp://scheduler:8786); the paths must be "
                          "on storage every worker sees.")] = None,
    partition: Annotated[int, typer.Option(
        "--partition", min=1, max=100_000, help="With --cluster: objects per task.")] = 64,
) -> None:
    """Scan files, directories, Maildirs, mbox files or stdin; exit 0 clean, 1 infected,
    2 error (like clamscan)."""
    import time

    from .observability import ScanLog, scan_event
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

    cfg = _load_config(config, ctx)
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
        from .quarantine import open_store

        try:
            store = open_store(cfg, maildir=False)
        except AvgateError as exc:
            typer.echo(f"avgate: {exc}", err=True)
            raise typer.Exit(2) from None
    scan_log: ScanLog | None = None
    if cfg.log.path:
        # on-demand scans go to the same scan log as online ones (never to stdout: that is
        # the report)
        try:
            scan_log = ScanLog(str(Path(cfg.base_dir, cfg.log.path)), cfg.log.level)
        except OSError as exc:
            typer.echo(f"avgate: cannot open the scan log {cfg.log.path}: "
                       f"{exc.strerror or exc}", err=True)
            raise typer.Exit(2) from None
    actions = Actions(action, store)
    summary = Summary()
    # scan-log events of mbox messages whose action runs at the end (Actions.finish)
    deferred: dict[str, dict[str, Any]] = {}

    def on_error(path: str, reason: str) -> None:
        summary.errors += 1
        if json_out:
            _out(json.dumps({"path": path, "status": "error", "reason": reason}))
        else:
            _say(f"{path}: {reason} ERROR")
        if scan_log is not None:
            scan_log.log({"event": "error", "frontend": "ondemand", "source": path,
                          "error": reason})

    def report(label: str, result_dict: dict[str, object], status: ScanStatus,
               virus: str, reason: str) -> None:
        if json_out:
            _out(json.dumps({"path": label, **result_dict}))
        elif status is ScanStatus.INFECTED:
            _say(f"{label}: {virus} FOUND")
        elif status is ScanStatus.SKIPPED:
            _say(f"{label}: {reason or 'not scanned'} SKIPPED")
        elif status is ScanStatus.UNKNOWN:
            _say(f"{label}: {reason or 'undecidable'} UNKNOWN")
        elif status is ScanStatus.ERROR:
            _say(f"{label}: {reason} ERROR")

    def log_scan(event: dict[str, Any], outcome: ActionOutcome | None) -> None:
        """Log one object's scan with the action that was carried out (none if it failed)."""
        if scan_log is None:
            return
        if outcome is not None:
            if outcome.action == "error":
                event["action_error"] = outcome.detail
            else:
                event["actions"] = ["quarantine" if outcome.action == "quarantined"
                                    else "delete"]
                if outcome.action == "quarantined":
                    event["ids"] = {"quarantine": outcome.detail}
        scan_log.log(event)

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
            _say(f"{outcome.label}: Removed.")
        elif outcome.action == "quarantined":
            _say(f"{outcome.label}: moved to quarantine {outcome.detail}")
        else:
            _say(f"{outcome.label}: {action} failed: {outcome.detail} ERROR")

    # the workers build their scan service from this config file's text, exactly as read here
    cluster_config = (Path(cfg.source).read_text(encoding="utf-8")
                      if cluster is not None and cfg.source else "")
    cluster_paths = [str(Path(p).absolute()) for p in paths if p != "-"]
    show_progress = (not json_out and not no_progress and sys.stderr.isatty()
                     and any(Path(p).is_dir() for p in paths if p != "-"))

    async def run() -> None:
        service: ScanService | None = None
        if cluster is None:
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
        engines = ""
        try:
            targets = iter_targets(paths, summary, on_error, since=since_ts)
            if service is not None:
                results = scan_targets(service, targets, jobs=jobs)
            else:
                assert cluster is not None
                from .cluster import cluster_scan

                results = cluster_scan(cluster, cfg.source or "", cluster_config,
                                       cluster_paths, targets, partition=partition)
            async for target, result in results:
                if not engines and result.engines:
                    engines = ", ".join(f"{e.name} {e.version}" for e in result.engines)
                summary.add(result)
                report(target.label, result.to_dict(), result.status, result.virus,
                       result.reason)
                event = scan_event(result, frontend="ondemand", rule="ondemand",
                                   source=target.label)
                if actions.deferred(target, result):
                    actions.handle(target, result)
                    deferred[target.label] = event
                    continue
                outcome = actions.handle(target, result)
                if outcome is not None:
                    report_action(outcome)
                log_scan(event, outcome)
                if progress is not None and task is not None:
                    progress.update(task, advance=1, description=target.label[-60:])
            for outcome in actions.finish():
                report_action(outcome)
                if outcome.label in deferred:
                    log_scan(deferred.pop(outcome.label), outcome)
        except AvgateError as exc:  # the cluster cannot run this scan: nothing was scanned
            typer.echo(f"avgate: {exc}", err=True)
            raise typer.Exit(2) from None
        finally:
            if progress is not None:
                progress.stop()
            if service is not None:
                engines = ", ".join(f"{e.name} {e.version()}" for e in service.engines)
                await service.close()
            if store is not None:
                store.close()
            if scan_log is not None:
                for event in deferred.values():  # interrupted before their action ran
                    scan_log.log(event)
                scan_log.log({"event": "scan_summary", "frontend": "ondemand",
                              "action": action, **summary.to_dict()})
                scan_log.close()
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
        if state is not None and not json_out and not quiet:
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
def selftest(ctx: typer.Context, config: ConfigOpt = None) -> None:
    """Send EICAR (plain, zipped, base64 in MIME) through every configured engine."""
    from .scan import ScanService
    from .spool import Spool

    cfg = _load_config(config, ctx)

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
            _print_engine_stats(service.engines)
        finally:
            await service.close()
        _out(f"selftest: {'passed' if not failures else f'{failures} check(s) failed'}")
        return 1 if failures else 0

    raise typer.Exit(asyncio.run(run()))


@config_app.command("show")
def config_show(ctx: typer.Context, config: ConfigOpt = None,
                json_out: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Print the effective configuration."""
    cfg = _load_config(config, ctx)
    data = cfg.to_dict()
    if json_out:
        _out(json.dumps(data, indent=2))
    else:
        _out(f"# effective config (source: {cfg.source or 'built-in defaults'})")
        _out(config_mod.render_toml(data))


@config_app.command("check")
def config_check(ctx: typer.Context,
                 file: Annotated[str | None, typer.Argument(help="Config file.")] = None,
                 config: ConfigOpt = None) -> None:
    """Validate a config file; exit 0 when valid, 1 with the reasons otherwise."""
    path = file or config_mod.resolve_path(config_path(config, ctx))
    if path is None:
        _out("no config file given: the built-in defaults are valid")
        raise typer.Exit(0)
    try:
        cfg = config_mod.load(path)
    except ConfigError as exc:
        for line in exc.problems:
            _out(line)
        raise typer.Exit(1) from None
    from .serve import exposure_warnings, mode_warnings

    for line in exposure_warnings(cfg) + mode_warnings(cfg):
        _out(line.removeprefix("avgate: "))
    _out(f"{path}: OK")


@app.command()
def serve(ctx: typer.Context, config: ConfigOpt = None) -> None:
    """Run the enabled front-ends."""
    from .serve import run

    cfg = _load_config(config, ctx)
    raise typer.Exit(run(cfg))


@app.command("qmail-queue")
def qmail_queue(ctx: typer.Context, config: ConfigOpt = None) -> None:
    """Drop-in for qmail-queue (QMAILQUEUE): message on fd 0, envelope on fd 1."""
    from .frontends.qmail import qmail_queue_command

    raise typer.Exit(qmail_queue_command(config_path(config, ctx)))


def _print_engine_stats(engines: list[Any]) -> None:
    """Signature counts per database file of the engines that have them (embedded)."""
    for engine in engines:
        stats = getattr(engine, "stats", None)
        if callable(stats):
            for line in stats():
                _out(f"  {engine.name}: {line}")


@app.command()
def version(ctx: typer.Context, config: ConfigOpt = None,
            engines: Annotated[bool, typer.Option(
                "--engines", help="Load the configured engines; print their versions and "
                "signature counts (loaded/unsupported per database file).")] = False) -> None:
    """Print the avgate version."""
    _out(f"avgate {__version__}")
    if not engines:
        return
    from .scan import ScanService

    cfg = _load_config(config, ctx)

    async def run() -> int:
        service = ScanService.from_config(cfg)
        try:
            await service.start()
        except AvgateError as exc:
            _out(f"engines did not start: {exc}")
            return 1
        try:
            for engine in service.engines:
                _out(f"{engine.name}: {engine.version()}")
            _print_engine_stats(service.engines)
        finally:
            await service.close()
        return 0

    raise typer.Exit(asyncio.run(run()))


@app.command()
def update(ctx: typer.Context, config: ConfigOpt = None,
           mirror: Annotated[str | None, typer.Option(
               help="Fetch main/daily/bytecode .cvd from this private mirror URL (verified "
               "like a load) instead of running freshclam.")] = None) -> None:
    """Update ClamAV's database (the embedded engine's clamav_db): freshclam, or a mirror.

    A running gateway picks the new files up by itself (reload_interval)."""
    import shutil
    import subprocess

    from .engines.clamavdb import update_from_mirror
    from .engines.embedded import DEFAULT_CLAMAV_DB

    cfg = _load_config(config, ctx)
    base = Path(cfg.source).parent if cfg.source else Path()
    datadir = next((base / p for e in cfg.engines if getattr(e, "type", "") == "embedded"
                    for p in (getattr(e, "clamav_db", None) or ())), None)
    mirror = mirror or cfg.update.mirror
    if mirror is not None:
        target = datadir or Path(DEFAULT_CLAMAV_DB)
        try:
            for line in update_from_mirror(mirror, target):
                _out(line)
        except AvgateError as exc:
            _out(f"avgate update: {exc}")
            raise typer.Exit(1) from None
        raise typer.Exit(0)
    freshclam = shutil.which("freshclam")
    if freshclam is None:
        _out("avgate update: freshclam is not installed (Debian: clamav-freshclam); "
             "or use --mirror URL")
        raise typer.Exit(2)
    command = [freshclam, *([f"--datadir={datadir}"] if datadir else [])]
    _out(f"running {' '.join(command)}")
    raise typer.Exit(subprocess.run(command, check=False).returncode)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
