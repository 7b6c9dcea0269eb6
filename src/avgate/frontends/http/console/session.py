"""Console sign-in sessions: signed, stateless cookies (any ``serve`` worker can check them).

A session cookie is ``v1.<payload>.<mac>``: the payload (base64url JSON) names the token it was
opened with (a fingerprint, never the token), a random nonce, when it was issued and when it
was last used; the MAC is HMAC-SHA256 under a key derived from every configured token (or
``[http] console_secret``), so changing the tokens signs everybody out. On every request the
roles are looked up afresh from the token the fingerprint names: a token removed from the
config (a reload) ends its sessions at once, and a role taken away is gone on the next page.

Idle sessions expire (``console_idle_timeout``); none lives longer than ``MAX_AGE``. Sign-in
always issues a new nonce (no session fixation: a cookie planted before sign-in is never the
one after it). The CSRF token of a session is an HMAC of its nonce, sent in every form and
checked on every POST. Signing out clears the cookie in the browser; as the cookie is
stateless, a copy taken before that stays valid until it idles out (say so to operators;
short idle timeouts limit it).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

from ..settings import HttpSettings

COOKIE = "avgate_console"
PRE_COOKIE = "avgate_console_signin"  # the sign-in form's CSRF nonce (double submit)
MAX_AGE = 12 * 3600.0  # no session lives longer than this, however busy
REFRESH = 60.0  # the last-use time in the cookie moves at most once a minute


def fingerprint(token: str) -> str:
    return hashlib.sha256(b"avgate-console-user\0" + token.encode()).hexdigest()[:16]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True, slots=True)
class Session:
    user: str  # the token's name, or "token-<fingerprint>"
    fp: str
    roles: frozenset[str]
    nonce: str
    issued: float
    active: float

    def can(self, role: str) -> bool:
        return role in self.roles


class Sessions:
    """Issue and check session cookies for one ``[http]`` config (see the module docstring)."""

    def __init__(self, settings: HttpSettings) -> None:
        self.settings = settings
        secret = settings.console_secret
        material = secret.encode() if secret else b"\0".join(
            sorted(t.token.encode() for t in settings.tokens))
        self._key = hashlib.sha256(b"avgate-console-key\0" + material).digest()

    def _mac(self, purpose: str, text: str) -> str:
        return _b64(hmac.new(self._key, f"{purpose}\0{text}".encode(), "sha256").digest())

    # -- sign-in -----------------------------------------------------------------------------
    def sign_in(self, token: str, now: float | None = None) -> tuple[Session, str] | None:
        """(session, cookie value) for a valid token with ``read``; None otherwise. Every
        token is compared, always, so the time taken does not tell which one matched."""
        roles = self.settings.roles_for(f"Bearer {token}")
        if roles is None or "read" not in roles:
            return None
        fp = fingerprint(token)
        now = time.time() if now is None else now
        session = Session(self._user(fp), fp, roles, secrets.token_urlsafe(16), now, now)
        return session, self.cookie(session)

    def _user(self, fp: str) -> str:
        for t in self.settings.tokens:
            if fingerprint(t.token) == fp:
                return t.name or f"token-{fp[:8]}"
        return f"token-{fp[:8]}"

    def cookie(self, s: Session) -> str:
        payload = _b64(json.dumps({"f": s.fp, "n": s.nonce, "i": s.issued, "a": s.active},
                                  separators=(",", ":")).encode())
        return f"v1.{payload}.{self._mac('session', payload)}"

    # -- each request ------------------------------------------------------------------------
    def check(self, value: str | None, now: float | None = None) -> Session | None:
        """The session a cookie carries, or None (missing, forged, expired, token gone)."""
        if not value or value.count(".") != 2:
            return None
        version, payload, mac = value.split(".")
        if version != "v1" or not hmac.compare_digest(mac, self._mac("session", payload)):
            return None
        try:
            data = json.loads(_unb64(payload))
            fp, nonce = str(data["f"]), str(data["n"])
            issued, active = float(data["i"]), float(data["a"])
        except (ValueError, KeyError, TypeError):
            return None
        now = time.time() if now is None else now
        if now - active > self.settings.console_idle_timeout or now - issued > MAX_AGE:
            return None
        roles: set[str] = set()
        for t in self.settings.tokens:  # the roles as configured now
            if fingerprint(t.token) == fp:
                roles.update(t.roles)
        if "read" not in roles:
            return None
        return Session(self._user(fp), fp, frozenset(roles), nonce, issued, active)

    def touched(self, s: Session, now: float | None = None) -> str | None:
        """A refreshed cookie when the last-use time should move (sliding idle expiry)."""
        now = time.time() if now is None else now
        if now - s.active < REFRESH:
            return None
        return self.cookie(Session(s.user, s.fp, s.roles, s.nonce, s.issued, now))

    # -- CSRF --------------------------------------------------------------------------------
    def csrf(self, s: Session) -> str:
        return self._mac("csrf", s.nonce)

    def csrf_ok(self, s: Session, given: str) -> bool:
        return bool(given) and hmac.compare_digest(given, self.csrf(s))

    def signin_csrf(self, pre_nonce: str) -> str:
        return self._mac("signin", pre_nonce)

    def signin_csrf_ok(self, pre_nonce: str | None, given: str) -> bool:
        return bool(pre_nonce and given) and hmac.compare_digest(
            given, self.signin_csrf(pre_nonce or ""))
