"""Issue 20 formats through the SMTP front-end end to end: a winmail.dat (MS-TNEF) with
EICAR inside is refused, its clean twin relayed; a PDF labelled image/png is still opened."""

from __future__ import annotations

from tests.corpus import CLEAN_TEXT, mail, make_tnef, pdf_embedded_file
from tests.integration.smtp.conftest import EICAR, RawClient, Sink, StartAvgate


async def _send(port: int, message: bytes) -> str:
    c = await RawClient.connect(port)
    await c.envelope()
    assert (await c.cmd("DATA")).startswith("354")
    reply = await c.cmd(message + b".\r\n")
    await c.cmd("QUIT")
    await c.close()
    return reply


async def test_tnef_and_pdf_attachments_are_opened(avgate: StartAvgate, sink: Sink) -> None:
    gw = await avgate(listener={"next_hop": sink.address})
    infected = mail(attachments=[("winmail.dat", make_tnef([("eicar test.com", EICAR)]))],
                    content_type="application/ms-tnef")
    reply = await _send(gw.port, infected)
    assert reply.startswith("550 5.7.1 Virus found: Eicar-Test-Signature"), reply
    disguised = mail(attachments=[("scan.png", pdf_embedded_file("eicar.com", EICAR))],
                     content_type="image/png")
    reply = await _send(gw.port, disguised)
    assert reply.startswith("550 5.7.1 Virus found: Eicar-Test-Signature"), reply
    assert sink.messages == []

    clean = mail(attachments=[("winmail.dat", make_tnef([("report.txt", CLEAN_TEXT)]))],
                 content_type="application/ms-tnef")
    reply = await _send(gw.port, clean)
    assert reply.startswith("250"), reply
    [delivered] = sink.messages
    assert delivered.data.endswith(clean)
    assert b"X-Virus-Status: Clean\r\n" in delivered.data
