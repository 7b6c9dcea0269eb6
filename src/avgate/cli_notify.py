"""``avgate notify digest``: tell each recipient what was held for them (run it daily from
cron or a systemd timer). Exit 0 when every digest was sent (or printed with
``--dry-run``), 1 when some could not be sent, 2 for a config or store error."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

import typer

from .cli_quarantine import ConfigOpt, config_path, load_config, safe
from .errors import AvgateError

notify_app = typer.Typer(no_args_is_help=True, help="Notices about held mail.")


@notify_app.callback()
def _notify_group(config: ConfigOpt = None) -> None:
    pass


@notify_app.command("digest")
def digest(ctx: typer.Context,
           hours: Annotated[float, typer.Option("--hours", min=0.01,
                                                help="What was held in the last HOURS.")] = 24,
           dry_run: Annotated[bool, typer.Option("--dry-run",
                                                 help="Print the digests, send nothing.")]
           = False,
           config: ConfigOpt = None) -> None:
    """Send each recipient one message listing what was held for them."""
    from .notify import Notifier
    from .policy import Policy
    from .quarantine import RecordFilter, open_store

    cfg = load_config(config_path(config, ctx))
    since = time.time() - hours * 3600
    try:
        store = open_store(cfg, maildir=False)
        try:
            records = store.list(RecordFilter(since=since))
        finally:
            store.close()
    except AvgateError as exc:
        typer.echo(f"avgate: {exc}", err=True)
        raise typer.Exit(2) from None
    notifier = Notifier(cfg.notify, Policy.from_settings(cfg.policy))
    notices = notifier.digest(records, since)
    if dry_run:
        for n in notices:
            for line in (f"To: {n.to}", f"Subject: {n.subject}", "", *n.body.splitlines(), ""):
                typer.echo(safe(line))
        typer.echo(f"{len(notices)} digest(s), none sent (--dry-run)")
        return
    sent = asyncio.run(notifier.send(notices))
    for n, ok in zip(notices, sent, strict=True):
        typer.echo(safe(f"{n.to}: {'sent' if ok else 'NOT SENT'}"))
    if not all(sent):
        raise typer.Exit(1)
