"""The HTML pages the proxy answers with instead of an object."""

from __future__ import annotations

from ..icap_pages import DEFAULT_BLOCK_PAGE, REFUSED_PAGE, UNAVAILABLE_PAGE, render

__all__ = ["DEFAULT_BLOCK_PAGE", "ERROR_PAGE", "REASONS", "REFUSED_PAGE", "UNAVAILABLE_PAGE",
           "error_page", "render"]

ERROR_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{status} {reason}</title></head>
<body><h1>{status} {reason}</h1>
<p>avgate could not serve <code>{url}</code>: {detail}</p></body></html>
"""

REASONS = {
    400: "Bad Request", 403: "Forbidden", 405: "Method Not Allowed", 408: "Request Timeout",
    411: "Length Required", 413: "Content Too Large", 414: "URI Too Long",
    417: "Expectation Failed", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 501: "Not Implemented", 502: "Bad Gateway",
    503: "Service Unavailable", 504: "Gateway Timeout", 505: "HTTP Version Not Supported",
    508: "Loop Detected",
}


def error_page(status: int, url: str, detail: str) -> bytes:
    return render(ERROR_PAGE, status=str(status), reason=REASONS.get(status, "Error"),
                  url=url, detail=detail)
