"""Fuzz message/partial reassembly (avgate.content.mime): mutated fragment sets."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings

from tests.corpus import EICAR, external_body_mail, mail, partial_mails, partial_set_mail
from tests.fuzz.documents import EXAMPLES, check, mutated

INNER = mail(attachments=[("eicar.com", EICAR)])
SEEDS = [partial_set_mail(INNER), partial_set_mail(INNER, keep=[2, 3]), partial_mails(INNER)[0],
         external_body_mail()]
TOKENS = [b"Content-Type: message/partial; id=x; number=1; total=2\r\n\r\n", b"number=",
          b"total=", b"id=", b"1", b"3", b"99999999", b"\r\n--frag-b\r\n", b"message/rfc822",
          b"Message/Partial", b"message/external-body", b"\r\n\r\n"]


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(SEEDS, TOKENS))
def test_mutated_fragment_sets(data: bytes) -> None:
    check(data)
