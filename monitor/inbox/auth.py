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
* Login throttling (security review H5, M1, M2): every attempt is counted BEFORE the
  password is checked (concurrent guesses cannot all slip through). Per account: a few
  free failures per window, then an exponential backoff (1 s, 2 s, 4 s ... capped), whatever
  address the guesses come from. Per client address: a much larger budget, and a
  (user, address) pair that has signed in successfully before is never held back by its
  address, so one NAT address cannot lock a ward out. HTTP 429 with ``Retry-After``.
* The client address comes from ``X-Forwarded-For`` only when the direct peer is a
  configured proxy (``INBOX_TRUSTED_PROXIES``), and then it is the right-most address that
  is not a proxy (the left-most is whatever the client wrote).
* Sessions are re-checked against the users file on every request: a removed user, or a
  changed role or password, drops the session. The idle timeout counts user actions only
  (``/api/stream`` and requests marked ``X-Inbox-Background`` do not extend it).
* Behind TLS (``secure_cookies``), cookies are ``Secure`` and named ``__Host-...``, and
  every response carries HSTS.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from aiohttp import web

# the one action policy (shared with the lifecycle and the actions API); re-exported here
from alerts.policy import allowed_actions, may
from schemas.alert import Role

__all__ = [
    "hash_password", "verify_password", "needs_rehash", "User", "UserDirectory", "ReloadingUserDirectory",
    "load_users", "user_fingerprint", "Session", "SessionStore",
    "LoginThrottle", "AuthConfig", "allowed_actions", "may", "SESSION_COOKIE", "LOGIN_CSRF_COOKIE",
    "auth_middleware", "security_headers_middleware", "current_session", "require_role",
    "ALL_WARDS", "ward_visibility",
]

SESSION_COOKIE = "inbox_session"
LOGIN_CSRF_COOKIE = "inbox_login_csrf"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"

#: OWASP password storage minimum for scrypt: N=2^17, r=8, p=1 (128 MiB, a few hundred ms)
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**17, 8, 1
_SCRYPT_MAXMEM = 256 * 1024 * 1024
#: stored hashes below this cost are refused outright (a hash with N=2 is no protection)
MIN_SCRYPT_N = 2**14
log = logging.getLogger("monitor.inbox.auth")


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
        if not (MIN_SCRYPT_N <= n_i <= 2**18 and 1 <= r_i <= 32 and 1 <= p_i <= 16 and n_i & (n_i - 1) == 0):
            return False
        want_b = _unb64(want)
        dk = hashlib.scrypt(password.encode("utf-8"), salt=_unb64(salt), n=n_i, r=r_i, p=p_i,
                            maxmem=_SCRYPT_MAXMEM, dklen=len(want_b))
    except (ValueError, TypeError, AttributeError):
        return False
    return hmac.compare_digest(dk, want_b)


def needs_rehash(stored: str) -> bool:
    """True when a stored hash is below the current cost (re-hash it: ``monitor inbox hash-password``)."""
    try:
        _, n, r, p, _, _ = stored.split("$")
        return int(n) * int(p) < _SCRYPT_N * _SCRYPT_P or int(r) < _SCRYPT_R
    except ValueError:
        return True


_DUMMY_HASHES: dict[tuple[str, str, str], str] = {}


def _dummy_hash_like(stored: str | None) -> str:
    """A hash of a random password with the same cost as ``stored`` (or the default):
    verifying an unknown user costs what a real one does (no user enumeration by timing)."""
    n, r, p = str(_SCRYPT_N), str(_SCRYPT_R), str(_SCRYPT_P)
    if stored:
        try:
            _, n, r, p, _, _ = stored.split("$")
        except ValueError:
            pass
    key = (n, r, p)
    if key not in _DUMMY_HASHES:
        try:
            _DUMMY_HASHES[key] = hash_password(secrets.token_urlsafe(16), n=int(n), r=int(r), p=int(p))
        except (ValueError, OverflowError, MemoryError):
            return _dummy_hash_like(None)
    return _DUMMY_HASHES[key]


@dataclass(frozen=True)
class User:
    username: str
    role: Role
    password_hash: str = field(repr=False)
    display_name: str = ""
    #: wards this user sees and acts on (review M5); ``"*"`` = every ward (an explicit grant);
    #: empty = none (admins see every ward regardless)
    wards: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return self.display_name or self.username


#: a ``wards`` entry granting every ward (an explicit grant)
ALL_WARDS = "*"


def ward_visibility(role: Role | str | None, wards: Iterable[str] = ()) -> Callable[[str | None], bool]:
    """The one ward policy (review M5), used by the inbox and the worker's actions API:
    ``visible(ward) -> bool`` for a user of ``role`` granted ``wards`` (the users file). Admins
    and users granted ``"*"`` see and act on every ward, also alerts and patients with no ward;
    others only the wards listed for them (an alert whose ward is unknown is refused)."""
    if role is not None and Role(role) == Role.ADMIN:
        return lambda ward: True
    granted = frozenset(str(w) for w in wards)
    if ALL_WARDS in granted:
        return lambda ward: True
    return lambda ward: ward is not None and ward in granted


class UserDirectory:
    def __init__(self, users: Iterable[User] = ()):
        self._users = {u.username: u for u in users}

    def __len__(self) -> int:
        return len(self._users)

    def get(self, username: str) -> User | None:
        return self._users.get(username)

    def authenticate(self, username: str, password: str) -> User | None:
        user = self.get(username)
        typical = next(iter(self._users.values())).password_hash if self._users else None
        ok = verify_password(password, user.password_hash if user else _dummy_hash_like(typical))
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
        from schemas.yaml_text import safe_load as load_yaml

        data = load_yaml(text)
    else:
        data = json.loads(text)
    return UserDirectory.from_data(data)


class ReloadingUserDirectory(UserDirectory):
    """The users file, re-read when its modification time or size changes (checked at most
    once per ``check_seconds``); an unreadable or invalid new version keeps the previous one.
    Sessions are re-validated against it on every request (review M8)."""

    def __init__(self, path: str | Path, *, check_seconds: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self.path = str(path)
        self.check_seconds = check_seconds
        self.clock = clock
        self._sig: tuple[float, int] | None = None
        self._checked = float("-inf")
        super().__init__()
        self.refresh(force=True)

    def refresh(self, force: bool = False) -> None:
        now = self.clock()
        if not force and now - self._checked < self.check_seconds:
            return
        self._checked = now
        try:
            st = os.stat(self.path)
            sig = (st.st_mtime, st.st_size)
            if sig == self._sig:
                return
            fresh = load_users(self.path)
        except (OSError, ValueError) as exc:
            if force and self._sig is None:
                raise
            log.warning("inbox: users file unreadable or invalid, keeping the previous one (%s)", type(exc).__name__)
            return
        self._users = fresh._users
        self._sig = sig

    def get(self, username: str) -> User | None:
        self.refresh()
        return self._users.get(username)


# --------------------------------------------------------------------------- sessions


def user_fingerprint(user: User) -> str:
    """Changes when the user's role or password changes: such a session is dropped."""
    return hashlib.sha256(f"{user.username}\x00{user.role}\x00{user.password_hash}".encode()).hexdigest()[:24]


@dataclass
class Session:
    username: str
    role: Role
    display_name: str
    csrf_token: str
    created_at: float
    last_seen: float
    fingerprint: str = ""


class SessionStore:
    """Server-side sessions keyed by sha256(cookie token); idle and absolute expiry."""

    def __init__(self, *, idle_seconds: float = 30 * 60, max_seconds: float = 12 * 3600,
                 clock: Callable[[], float] = time.time, max_sessions: int = 10_000, max_per_user: int = 20):
        self.max_per_user = max_per_user
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
        mine = [k for k, v in self._sessions.items() if v.username == user.username]
        if len(mine) >= self.max_per_user:  # review L7: one account cannot evict everyone else
            oldest = min(mine, key=lambda k: self._sessions[k].last_seen)
            del self._sessions[oldest]
        if len(self._sessions) >= self.max_sessions:  # drop the oldest
            oldest = min(self._sessions, key=lambda k: self._sessions[k].last_seen)
            del self._sessions[oldest]
        token = secrets.token_urlsafe(32)
        now = self.clock()
        sess = Session(user.username, user.role, user.label, secrets.token_urlsafe(32), now, now,
                       user_fingerprint(user))
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
    """Per-account backoff plus a per-address budget (security review H5, M1, M2).

    * Account: ``max_failures`` free failures per ``window_seconds``; after that each
      further attempt waits ``2^(failures - max_failures)`` seconds after the last failure,
      capped at ``lockout_seconds``. The address plays no part, so rotating
      ``X-Forwarded-For`` (or a botnet) gains nothing.
    * Address: ``max_failures_per_address`` failures per window, then the same backoff --
      but never for a (user, address) pair that has signed in before: a shared NAT or
      proxy address cannot be used to lock out the people who work behind it.
    * :meth:`begin` checks AND counts the attempt before the password is verified, so
      concurrent guesses cannot all pass the check (M1); :meth:`success` takes it back.
    """

    def __init__(self, *, max_failures: int = 5, window_seconds: float = 900, lockout_seconds: float = 300,
                 max_failures_per_address: int = 100, clock: Callable[[], float] = time.time,
                 max_keys: int = 50_000):
        self.max_failures = max_failures
        self.max_failures_per_address = max_failures_per_address
        self.window = window_seconds
        self.lockout = lockout_seconds
        self.clock = clock
        self.max_keys = max_keys
        self._fails: dict[str, list[float]] = {}
        self._known: dict[str, float] = {}  # "user|address" -> last successful sign-in

    @staticmethod
    def _ukey(username: str) -> str:
        return "u:" + username.strip().lower()

    @staticmethod
    def _pair(username: str, address: str) -> str:
        return f"{username.strip().lower()}|{address}"

    def _wait(self, key: str, free: int, now: float) -> float:
        fails = [t for t in self._fails.get(key, ()) if now - t < self.window]
        if fails:
            self._fails[key] = fails
        else:
            self._fails.pop(key, None)
        if len(fails) < free:
            return 0.0
        backoff = min(self.lockout, 2.0 ** (len(fails) - free))
        return max(0.0, fails[-1] + backoff - now)

    def _keys(self, username: str, address: str) -> list[tuple[str, int]]:
        keys = [(self._ukey(username), self.max_failures)]
        if self._pair(username, address) not in self._known:
            keys.append(("a:" + address, self.max_failures_per_address))
        return keys

    def retry_after(self, username: str, address: str) -> float:
        """Seconds until a login attempt is allowed again (0: allowed). Does not count."""
        now = self.clock()
        return max(self._wait(k, free, now) for k, free in self._keys(username, address))

    def begin(self, username: str, address: str) -> float:
        """Check and count one attempt (as a failure until :meth:`success`). Returns the
        wait in seconds (> 0: refused, nothing counted)."""
        wait = self.retry_after(username, address)
        if wait <= 0:
            self.failure(username, address)
        return wait

    def failure(self, username: str, address: str) -> None:
        now = self.clock()
        for k, _ in self._keys(username, address):
            self._fails.setdefault(k, []).append(now)
        if len(self._fails) > self.max_keys:  # bound memory under a spray attack
            self._fails = {k: v for k, v in self._fails.items() if v and now - v[-1] < self.window}

    def success(self, username: str, address: str) -> None:
        """The attempt counted by :meth:`begin` succeeded: forget the account's failures,
        take the attempt back from the address, remember the pair as known."""
        self._fails.pop(self._ukey(username), None)
        akey = "a:" + address
        if self._pair(username, address) not in self._known and self._fails.get(akey):
            self._fails[akey].pop()
        self._known[self._pair(username, address)] = self.clock()
        if len(self._known) > self.max_keys:
            for k in sorted(self._known, key=self._known.get)[: len(self._known) // 2]:
                del self._known[k]


# --------------------------------------------------------------------------- aiohttp glue


@dataclass
class AuthConfig:
    users: UserDirectory
    sessions: SessionStore = field(default_factory=SessionStore)
    throttle: LoginThrottle = field(default_factory=LoginThrottle)
    #: None: Secure cookies when the request came over https (or X-Forwarded-Proto: https
    #: if ``trust_proxy``); True/False: always / never
    secure_cookies: bool | None = None
    #: honour X-Forwarded-For / -Proto (from ``trusted_proxies``; loopback when that is empty)
    trust_proxy: bool = False
    #: networks of the reverse proxies whose forwarded headers are believed
    trusted_proxies: tuple = ()
    #: paths reachable without a session (exact match, or prefix when ending with "/")
    public: tuple[str, ...] = ("/login", "/healthz", "/readyz", "/static/")

    def __post_init__(self) -> None:
        nets = tuple(ipaddress.ip_network(str(n).strip(), strict=False) if not isinstance(
            n, (ipaddress.IPv4Network, ipaddress.IPv6Network)) else n for n in self.trusted_proxies if str(n).strip())
        if self.trust_proxy and not nets:
            nets = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
        self.trusted_proxies = nets
        self.trust_proxy = bool(nets)

    @property
    def session_cookie(self) -> str:
        return ("__Host-" if self.secure_cookies else "") + SESSION_COOKIE

    @property
    def login_csrf_cookie(self) -> str:
        return ("__Host-" if self.secure_cookies else "") + LOGIN_CSRF_COOKIE

    def is_public(self, path: str) -> bool:
        return any(path == p or (p.endswith("/") and path.startswith(p)) for p in self.public)

    def valid_session(self, token: str | None, *, touch: bool = True) -> Session | None:
        """The session, if it exists, has not expired, and its user still exists with the
        same role and password (else it is destroyed)."""
        sess = self.sessions.get(token, touch=touch)
        if sess is not None:
            user = self.users.get(sess.username)
            if user is None or user_fingerprint(user) != sess.fingerprint:  # removed, new role or password
                self.sessions.destroy(token)
                return None
        return sess

    def _is_proxy(self, host: str | None) -> bool:
        try:
            ip = ipaddress.ip_address((host or "").strip().split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in n for n in self.trusted_proxies if n.version == ip.version)

    def client_address(self, request: web.Request) -> str:
        """The right-most address in ``X-Forwarded-For`` that is not a trusted proxy, when
        the direct peer is one; else the direct peer (review H5)."""
        remote = request.remote or "?"
        if not self.trust_proxy or not self._is_proxy(remote):
            return remote
        hops = [h.strip() for h in ",".join(request.headers.getall("X-Forwarded-For", [])).split(",") if h.strip()]
        for hop in reversed(hops):
            if not self._is_proxy(hop):
                return hop[:64]
        return hops[0][:64] if hops else remote

    def is_https(self, request: web.Request) -> bool:
        if request.secure:
            return True
        return (self.trust_proxy and self._is_proxy(request.remote)
                and request.headers.get("X-Forwarded-Proto", "").lower() == "https")

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
    token = request.cookies.get(cfg.session_cookie)
    # background traffic (the event stream, refreshes it triggers) does not extend the idle timeout
    background = request.path == "/api/stream" or request.headers.get("X-Inbox-Background") == "1"
    sess = cfg.valid_session(token, touch=not background)
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
    if cfg is not None and (cfg.secure_cookies or cfg.is_https(request)):
        h.setdefault("Strict-Transport-Security", "max-age=31536000")


def require_role(request: web.Request, *roles: Role) -> Session:
    sess = current_session(request)
    if sess.role not in roles:
        raise web.HTTPForbidden(text=json.dumps({"error": "forbidden for your role"}), content_type="application/json")
    return sess
