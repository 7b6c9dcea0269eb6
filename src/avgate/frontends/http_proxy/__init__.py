"""The scanning HTTP/1.1 forward proxy (``[http_proxy]``): :mod:`.settings` (its section and
ACL tables), :mod:`.headers` and :mod:`.acl` (pure request/header/ACL logic), :mod:`.relay`
(what of a body leaves before the verdict), :mod:`.upstream` (the client side),
:mod:`.proxy` (the server). HTTP/1.1 framing on both sides is h11's (sans-IO)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .settings import AclSettings, HttpProxySettings

if TYPE_CHECKING:
    from ...gateway import Gateway
    from ..listen import Listener, ListenOptions

__all__ = ["AclSettings", "HttpProxySettings", "start"]


async def start(gateway: Gateway, options: ListenOptions) -> list[Listener]:
    """Start the ``[http_proxy]`` listener (see :func:`.proxy.start`)."""
    from .proxy import start as start_proxy

    return await start_proxy(gateway, options)
