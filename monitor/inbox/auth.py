"""Authentication for the nurse inbox: users, scrypt passwords, sessions, CSRF, throttling, roles.

* Users come from a JSON or YAML file (path in ``INBOX_USERS_FILE``)::

      users:
        - {username: alice, role: nurse, password_hash: "scrypt$16384$8$1$<salt>$<hash>",
           display_name: "Alice N.", wards: [W1]}

  ``monitor inbox hash-password`` prints a hash for a password read from stdin/tty.
* Passwords: ``hashlib.scrypt`` with a random 16-byte salt per user; verified in constant time.
* Sessions live on the server (in memory): the cookie holds only a random token; the store
  keeps ``sha256(token)``. Idle and absolute expiry. Cookie: HttpOnly, SameSite=Strict, Path=/,
  Secure when served over https (or forced by configuration).
* CSRF: one random token per session, required on every state-changing request (header
  ``X-CSRF-Token`` or form field ``csrf_token``); the login form uses a double-submit cookie.
  Requests whose ``Origin`` names another host are refused too.
* Login throttling: failures per username and per client address within a window lock the
  pair out for a while (HTTP 429 with ``Retry-After``).
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from aiohttp import web

from schemas.alert import ActionKind, Role
from schemas.findings import Severity

__all__ = [
    "hash_password", "verify_password", "User", "UserDirectory", "load_users", "Session", "SessionStore",
    "LoginThrottle", "AuthConfig", "allowed_actions", "may", "SESSION_COOKIE", "LOGIN_CSRF_COOKIE",
    "auth_middleware", "security_headers_middleware", "current_session", "require_role",
]

SESSION_COOKIE = "inbox_session"
LOGIN_CSRF_COOKIE = "inbox_login_csrf"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"

_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1
_SCRYPT_MAXMEM = 64 * 1024 * 1024


def _b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).decode("ascii").rstrip("=")


def _unb64(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def hash_password(password: str, *, n: int = _SCRYPT_N, r: int = _SCRYPT_R, p: int = _SCRYPT_P,
                  salt: bytes | None = None) -> str:
    """``scrypt$N$r$p$salt$hash`` (salt and hash URL-safe base64, 16 and 32 bytes)."""
    if not isinstance(password, str) or password == "":
        raise ValueError("password must be a non-empty string")
    salt = salt if salt is not None else os.urandom(16)
    dk = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=_SCRYPT_MAXMEM, dklen=32)
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(dk)}"


def verify_password(password: str, stored: str) -> bool:
    """Constant-time check of ``password`` against a ``hash_password`` string; False on any malformation."""
    try:
        scheme, n, r, p, salt, want = stored.split("$")
        if scheme != "scrypt":
            return False
        n_i, r_i, p_i = int(n), int(r), int(p)
        if not (2 <= n_i <= 2**20 and 1 <= r_i <= 32 and 1 <= p_i <= 16):
            return False
        want_b = _unb64(want)
        dk = hashlib.scrypt(password.encode("utf-8"), salt=_unb64(salt), n=n_i, r=r_i, p=p_i,
                            maxmem=_SCRYPT_MAXMEM, dklen=len(want_b))
    except (ValueError, TypeError, AttributeError):
        return False
    return hmac.compare_digest(dk, want_b)


# a hash of a random password: verifying against it costs the same as a real user (no user enumeration by timing)
_DUMMY_HASH = hash_password(secrets.token_urlsafe(16))


@dataclass(frozen=True)
class User:
    username: str
    role: Role
    password_hash: str = field(repr=False)
    display_name: str = ""
    #: wards this user sees by default (empty: all)
    wards: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return self.display_name or self.username


class UserDirectory:
    def __init__(self, users: Iterable[User] = ()):
        self._users = {u.username: u for u in users}

    def __len__(self) -> int:
        return len(self._users)

    def get(self, username: str) -> User | None:
        return self._users.get(username)

    def authenticate(self, username: str, password: str) -> User | None:
        user = self._users.get(username)
        ok = verify_password(password, user.password_hash if user else _DUMMY_HASH)
        return user if (user is not None and ok) else None

    @classmethod
    def from_data(cls, data: Any) -> "UserDirectory":
        if isinstance(data, Mapping) and "users" in data:
            data = data["users"]
        if isinstance(data, Mapping):  # {username: {...}}
            data = [{"username": k, **v} for k, v in data.items()]
        if not isinstance(data, list):
            raise ValueError("users file: expected a list of users (or {users: [...]})")
        users = []
        for i, item in enumerate(data):
            if not isinstance(item, Mapping):
                raise ValueError(f"users file: entry {i} is not a mapping")
            try:
                username = str(item["username"]).strip()
                role = Role(str(item["role"]))
                ph = str(item["password_hash"])
            except KeyError as exc:
                raise ValueError(f"users file: entry {i} lacks {exc.args[0]}") from None
            except ValueError:
                raise ValueError(f"users file: entry {i} has an unknown role {item.get('role')!r}") from None
            if not username or not ph.startswith("scrypt$"):
                raise ValueError(f"users file: entry {i} needs a username and an scrypt password_hash")
            users.append(User(username=username, role=role, password_hash=ph,
                              display_name=str(item.get("display_name") or ""),
                              wards=tuple(str(w) for w in (item.get("wards") or ()))))
        return cls(users)


def load_users(path: str | Path | None = None) -> UserDirectory:
    """Read users from ``path`` (default: env ``INBOX_USERS_FILE``); JSON, or YAML by extension."""
    path = path or os.environ.get("INBOX_USERS_FILE")
    if not path:
        raise ValueError("no users file: set INBOX_USERS_FILE")
    text = Path(path).read_text(encoding="utf-8")
    if str(path).endswith((".yaml", ".yml")):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    return UserDirectory.from_data(data)


# --------------------------------------------------------------------------- sessions


@dataclass
class Session:
    username: str
    role: Role
    display_name: str
    csrf_token: str
    created_at: float
    last_seen: float


class SessionStore:
    """Server-side sessions keyed by sha256(cookie token); idle and absolute expiry."""

    def __init__(self, *, idle_seconds: float = 30 * 60, max_seconds: float = 12 * 3600,
                 clock: Callable[[], float] = time.time, max_sessions: int = 10_000):
        self.idle_seconds = idle_seconds
        self.max_seconds = max_seconds
        self.clock = clock
        self.max_sessions = max_sessions
        self._sessions: dict[str, Session] = {}

    @staticmethod
    def _key(token: str) -> str:
        return hashlib.sha256(token.encode("utf-8")).hexdigest()

    def create(self, user: User) -> tuple[str, Session]:
        self.purge()
        if len(self._sessions) >= self.max_sessions:  # drop the oldest
            oldest = min(self._sessions, key=lambda k: self._sessions[k].last_seen)
            del self._sessions[oldest]
        token = secrets.token_urlsafe(32)
        now = self.clock()
        sess = Session(user.username, user.role, user.label, secrets.token_urlsafe(32), now, now)
        self._sessions[self._key(token)] = sess
        return token, sess

    def get(self, token: str | None, *, touch: bool = True) -> Session | None:
        if not token or len(token) > 128:
            return None
        key = self._key(token)
        sess = self._sessions.get(key)
        if sess is None:
            return None
        now = self.clock()
        if now - sess.last_seen > self.idle_seconds or now - sess.created_at > self.max_seconds:
            del self._sessions[key]
            return None
        if touch:
            sess.last_seen = now
        return sess

    def destroy(self, token: str | None) -> None:
        if token:
            self._sessions.pop(self._key(token), None)

    def purge(self) -> int:
        now = self.clock()
        dead = [k for k, s in self._sessions.items()
                if now - s.last_seen > self.idle_seconds or now - s.created_at > self.max_seconds]
        for k in dead:
            del self._sessions[k]
        return len(dead)

    def __len__(self) -> int:
        return len(self._sessions)


class LoginThrottle:
    """Lock out (username, address) pairs and addresses after repeated failures in a window."""

    def __init__(self, *, max_failures: int = 5, window_seconds: float = 300, lockout_seconds: float = 300,
                 max_failures_per_address: int = 20, clock: Callable[[], float] = time.time):
        self.max_failures = max_failures
        self.max_failures_per_address = max_failures_per_address
        self.window = window_seconds
        self.lockout = lockout_seconds
        self.clock = clock
        self._fails: dict[str, list[float]] = {}
        self._locked: dict[str, float] = {}

    def _keys(self, username: str, address: str) -> list[tuple[str, int]]:
        return [(f"u:{username.lower()}|{address}", self.max_failures), (f"a:{address}", self.max_failures_per_address)]

    def retry_after(self, username: str, address: str) -> float:
        """Seconds until a login attempt is allowed again (0: allowed)."""
        now = self.clock()
        wait = 0.0
        for k, _ in self._keys(username, address):
            until = self._locked.get(k)
            if until is not None:
                if until > now:
                    wait = max(wait, until - now)
                else:
                    del self._locked[k]
        return wait

    def failure(self, username: str, address: str) -> None:
        now = self.clock()
        for k, limit in self._keys(username, address):
            fails = [t for t in self._fails.get(k, []) if now - t < self.window]
            fails.append(now)
            self._fails[k] = fails
            if len(fails) >= limit:
                self._locked[k] = now + self.lockout
                self._fails[k] = []
        if len(self._fails) > 50_000:  # bound memory under a spray attack
            self._fails = {k: v for k, v in self._fails.items() if v and now - v[-1] < self.window}

    def success(self, username: str, address: str) -> None:
        self._fails.pop(self._keys(username, address)[0][0], None)


# --------------------------------------------------------------------------- roles


def may(role: Role | str, action: ActionKind | str, severity: Severity | str | None = None) -> bool:
    """Mirror of the lifecycle's role rules: silence is admin only; resolving a high or critical
    alert needs a physician or admin; everyone may acknowledge, note and escalate."""
    role = Role(role)
    action = ActionKind(action)
    if action == ActionKind.SILENCE:
        return role == Role.ADMIN
    if action == ActionKind.RESOLVE:
        sev = Severity(severity) if severity is not None else Severity.CRITICAL
        if sev in (Severity.HIGH, Severity.CRITICAL):
            return role in (Role.PHYSICIAN, Role.ADMIN)
    return True


def allowed_actions(role: Role | str, severity: Severity | str | None, is_open: bool) -> list[str]:
    kinds = [ActionKind.NOTE] if not is_open else [ActionKind.ACKNOWLEDGE, ActionKind.NOTE, ActionKind.ESCALATE,
                                                    ActionKind.RESOLVE, ActionKind.SILENCE]
    out = [k.value for k in kinds if may(role, k, severity)]
    if is_open and Severity(severity or "critical") == Severity.CRITICAL and "silence" in out:
        out.remove("silence")  # critical alerts cannot be silenced
    return out


# --------------------------------------------------------------------------- aiohttp glue


@dataclass
class AuthConfig:
    users: UserDirectory
    sessions: SessionStore = field(default_factory=SessionStore)
    throttle: LoginThrottle = field(default_factory=LoginThrottle)
    #: None: Secure cookies when the request came over https (or X-Forwarded-Proto: https
    #: if ``trust_proxy``); True/False: always / never
    secure_cookies: bool | None = None
    trust_proxy: bool = False
    #: paths reachable without a session (exact match, or prefix when ending with "/")
    public: tuple[str, ...] = ("/login", "/healthz", "/static/")

    def is_public(self, path: str) -> bool:
        return any(path == p or (p.endswith("/") and path.startswith(p)) for p in self.public)

    def is_https(self, request: web.Request) -> bool:
        if request.secure:
            return True
        return self.trust_proxy and request.headers.get("X-Forwarded-Proto", "").lower() == "https"

    def cookie_secure(self, request: web.Request) -> bool:
        return self.is_https(request) if self.secure_cookies is None else self.secure_cookies

    def set_cookie(self, request: web.Request, response: web.StreamResponse, name: str, value: str,
                   max_age: int | None = None) -> None:
        response.set_cookie(name, value, httponly=True, samesite="Strict", path="/", max_age=max_age,
                            secure=self.cookie_secure(request))


AUTH_KEY = web.AppKey("inbox_auth", AuthConfig)
SESSION_KEY = web.RequestKey("inbox_session", Session) if hasattr(web, "RequestKey") else "inbox_session"


def current_session(request: web.Request) -> Session:
    return request[SESSION_KEY]


def _is_api(request: web.Request) -> bool:
    return request.path.startswith("/api/")


def _deny(request: web.Request, status: int, message: str) -> web.Response:
    if _is_api(request) or request.method not in ("GET", "HEAD"):
        return web.json_response({"error": message}, status=status)
    return web.Response(status=status, text=message, content_type="text/plain")


def _same_origin(request: web.Request) -> bool:
    origin = request.headers.get("Origin")
    if origin is None:  # older browsers / non-browser clients: the CSRF token still applies
        return True
    if origin == "null":
        return False
    from urllib.parse import urlsplit

    parts = urlsplit(origin)
    return parts.netloc.lower() == (request.host or "").lower()


async def _csrf_ok(request: web.Request, expected: str) -> bool:
    token = request.headers.get(CSRF_HEADER)
    if token is None and request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        form = await request.post()
        token = form.get(CSRF_FIELD)
        token = token if isinstance(token, str) else None
    return bool(token) and hmac.compare_digest(str(token).encode(), expected.encode())


@web.middleware
async def auth_middleware(request: web.Request, handler):
    cfg = request.app[AUTH_KEY]
    unsafe = request.method not in ("GET", "HEAD", "OPTIONS")
    if unsafe and not _same_origin(request):
        return _deny(request, 403, "cross-origin request refused")
    if cfg.is_public(request.path):
        return await handler(request)
    sess = cfg.sessions.get(request.cookies.get(SESSION_COOKIE))
    if sess is None:
        if _is_api(request) or unsafe:
            return web.json_response({"error": "authentication required"}, status=401,
                                     headers={"WWW-Authenticate": 'Cookie realm="inbox"'})
        raise web.HTTPFound("/login")
    if unsafe and not await _csrf_ok(request, sess.csrf_token):
        return _deny(request, 403, "missing or invalid CSRF token")
    request[SESSION_KEY] = sess
    return await handler(request)


CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


@web.middleware
async def security_headers_middleware(request: web.Request, handler):
    try:
        resp = await handler(request)
    except web.HTTPException as exc:
        resp = exc
        _headers(request, resp)
        raise
    _headers(request, resp)
    return resp


def _headers(request: web.Request, resp: web.StreamResponse) -> None:
    if resp.prepared:  # SSE streams set their own headers before preparing
        return
    h = resp.headers
    h.setdefault("Content-Security-Policy", CSP)
    h.setdefault("X-Content-Type-Options", "nosniff")
    h.setdefault("Referrer-Policy", "same-origin")  # "no-referrer" makes Chromium send Origin: null
    h.setdefault("X-Frame-Options", "DENY")
    h.setdefault("Cross-Origin-Opener-Policy", "same-origin")
    if not request.path.startswith("/static/"):
        h.setdefault("Cache-Control", "no-store")
    cfg = request.app.get(AUTH_KEY)
    if cfg is not None and cfg.is_https(request):
        h.setdefault("Strict-Transport-Security", "max-age=31536000")


def require_role(request: web.Request, *roles: Role) -> Session:
    sess = current_session(request)
    if sess.role not in roles:
        raise web.HTTPForbidden(text=json.dumps({"error": "forbidden for your role"}), content_type="application/json")
    return sess
