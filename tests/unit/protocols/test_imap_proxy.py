"""IMAP proxy pieces without sockets: settings and how a part is scanned."""

from __future__ import annotations

import base64

import pytest

from avgate import config
from avgate.errors import ConfigError
from avgate.frontends import imap as fe
from avgate.spool import Spool

EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"


def test_settings() -> None:
    cfg = config.from_dict({"imap_proxy": {"server": "[::1]:143"}})
    assert cfg.imap_proxy is not None
    assert cfg.imap_proxy.server_address == ("::1", 143)
    assert str(cfg.imap_proxy.listen) == "127.0.0.1:10143"
    for bad, words in (({}, "server"), ({"server": "unix:/x"}, "host:port"),
                       ({"server": "a:1", "tls_key": "k.pem"}, "go together"),
                       ({"server": "a:1", "tls": "implicit"}, "implicit"),
                       ({"server": "a:1", "max_literal": 0}, "max_literal")):
        with pytest.raises(ConfigError, match=words):
            config.from_dict({"imap_proxy": bad})


def test_a_base64_part_is_scanned_as_the_client_decodes_it() -> None:
    encoded = base64.encodebytes(EICAR).replace(b"\n", b"\r\n")
    decoded = fe._decoded(Spool.from_bytes(encoded))
    assert decoded.getvalue() == EICAR
    text = b"plain text part, not base64!\r\n"
    assert fe._decoded(Spool.from_bytes(text)).getvalue() == text
