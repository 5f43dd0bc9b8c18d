"""Inbox sign-in and sessions (security review H5, M1, M2, M8, M10), through the real
aiohttp application over a loopback socket.

H5 on the old code: with ``INBOX_TRUST_PROXY=true`` the throttle keyed on the left-most
``X-Forwarded-For`` (written by the client): 30 wrong passwords from 30 forwarded
addresses were all checked (0 throttled)."""
from __future__ import annotations

import asyncio
import json
import re

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request

from monitor.inbox.app import create_inbox_app
from monitor.inbox.auth import (
    AuthConfig, LoginThrottle, ReloadingUserDirectory, SessionStore, User, UserDirectory, hash_password,
)
from monitor.settings import Settings
from schemas.alert import Role

from test_inbox_auth import FAST, PW, SECRET, store  # noqa: F401  (fixture)


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def directory() -> UserDirectory:
    return UserDirectory([User("nurse1", Role.NURSE, hash_password(PW["nurse1"], **FAST)),
                          User("doc1", Role.PHYSICIAN, hash_password(PW["doc1"], **FAST))])


async def make_client(store, **kw) -> TestClient:  # noqa: F811
    app = await create_inbox_app(Settings(), store=store, publish=None, secret=SECRET, start_kafka=False, **kw)
    client = TestClient(TestServer(app), cookie_jar=aiohttp.CookieJar(unsafe=True))
    await client.start_server()
    return client


async def attempt(client: TestClient, username: str, password: str, xff: str | None = None) -> int:
    r = await client.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', await r.text()).group(1)
    headers = {"X-Forwarded-For": xff} if xff else {}
    r = await client.post("/login", data={"username": username, "password": password, "csrf_token": token},
                          headers=headers, allow_redirects=False)
    return r.status


async def test_thirty_wrong_passwords_from_thirty_forwarded_addresses_are_mostly_throttled(store):  # noqa: F811
    clock = Clock()
    throttle = LoginThrottle(clock=clock)
    client = await make_client(store, users=directory(), throttle=throttle, trust_proxy=True)
    try:
        codes = [await attempt(client, "nurse1", f"guess-{i}", xff=f"203.0.113.{i + 1}") for i in range(30)]
        assert codes.count(401) <= throttle.max_failures, codes
        assert codes.count(429) >= 25, codes
        # the right password, from a fresh address, once the backoff has passed
        clock.t += throttle.retry_after("nurse1", "198.51.100.7") + 0.1
        assert await attempt(client, "nurse1", PW["nurse1"], xff="198.51.100.7") == 303
    finally:
        await client.close()


async def test_concurrent_guesses_are_counted_before_verification(store):  # noqa: F811
    throttle = LoginThrottle(clock=Clock())
    client = await make_client(store, users=directory(), throttle=throttle)
    try:
        codes = await asyncio.gather(*(attempt(client, "nurse1", f"guess-{i}") for i in range(40)))
        verified = [c for c in codes if c == 401]
        assert len(verified) <= throttle.max_failures, codes  # M1: was 40 x 401
        assert set(codes) <= {401, 429, 503}
    finally:
        await client.close()


def test_shared_address_cannot_lock_out_people_who_signed_in_from_it():
    clock = Clock()
    th = LoginThrottle(max_failures=5, max_failures_per_address=10, clock=clock)
    nat = "10.0.0.1"
    assert th.begin("amy", nat) == 0
    th.success("amy", nat)  # amy has signed in from the ward's NAT address before
    for i in range(10):  # an attacker behind the same NAT sprays other accounts
        assert th.begin(f"user{i}", nat) == 0
    assert th.retry_after("someone-new", nat) > 0  # the address budget holds back unknown pairs
    assert th.retry_after("amy", nat) == 0  # ... but not amy


def test_forwarded_for_is_believed_only_from_trusted_proxies():
    cfg = AuthConfig(users=UserDirectory(), trusted_proxies=("10.1.0.0/16",))

    def req(remote: str, xff: str):
        r = make_mocked_request("POST", "/login", headers={"X-Forwarded-For": xff, "X-Forwarded-Proto": "https"})
        return r.clone(remote=remote)

    # via the proxy: the right-most address that is not a proxy (the left-most is the client's own claim)
    assert cfg.client_address(req("10.1.2.3", "6.6.6.6, 192.0.2.10, 10.1.9.9")) == "192.0.2.10"
    assert cfg.is_https(req("10.1.2.3", "x"))
    # straight from a client: its header is ignored
    assert cfg.client_address(req("192.0.2.99", "6.6.6.6")) == "192.0.2.99"
    assert not cfg.is_https(req("192.0.2.99", "x"))


async def test_session_dropped_when_user_removed_or_role_changed(store, tmp_path):  # noqa: F811
    path = tmp_path / "users.json"

    def write(users):
        path.write_text(json.dumps({"users": users}))

    nurse = {"username": "nurse1", "role": "nurse", "password_hash": hash_password(PW["nurse1"], **FAST)}
    doc = {"username": "doc1", "role": "physician", "password_hash": hash_password(PW["doc1"], **FAST)}
    write([nurse, doc])
    users = ReloadingUserDirectory(path, check_seconds=0)
    client = await make_client(store, users=users)
    try:
        assert await attempt(client, "doc1", PW["doc1"]) == 303
        assert (await client.get("/api/me")).status == 200
        write([nurse, {**doc, "role": "nurse"}, {"username": "pad", "role": "nurse",
                                                 "password_hash": nurse["password_hash"]}])  # demoted
        assert (await client.get("/api/me")).status == 401
        assert await attempt(client, "nurse1", PW["nurse1"]) == 303
        assert (await client.get("/api/me")).status == 200
        write([doc])  # nurse1 removed
        assert (await client.get("/api/me")).status == 401
    finally:
        await client.close()


async def test_idle_timeout_counts_user_actions_only(store):  # noqa: F811
    clock = Clock()
    sessions = SessionStore(idle_seconds=600, clock=clock)
    client = await make_client(store, users=directory(), sessions=sessions)
    try:
        assert await attempt(client, "nurse1", PW["nurse1"]) == 303
        for _ in range(2):  # background refreshes (SSE-triggered list reloads) at +4.2 and +8.3 min
            clock.t += 250
            r = await client.get("/api/alerts", headers={"X-Inbox-Background": "1"})
            assert r.status == 200
        clock.t += 200  # 11.7 min after the last USER action (the old code counted the refreshes)
        assert (await client.get("/api/alerts", headers={"X-Inbox-Background": "1"})).status == 401
        assert await attempt(client, "nurse1", PW["nurse1"]) == 303
        clock.t += 300
        assert (await client.get("/api/alerts")).status == 200  # a user action extends it
        clock.t += 300
        assert (await client.get("/api/alerts")).status == 200
    finally:
        await client.close()


async def test_secure_cookies_use_host_prefix_and_hsts(store):  # noqa: F811
    client = await make_client(store, users=directory(), secure_cookies=True)
    try:
        r = await client.get("/login")
        assert "Strict-Transport-Security" in r.headers  # even though this hop is plain http (TLS proxy)
        cookie = r.headers["Set-Cookie"]
        assert cookie.startswith("__Host-inbox_login_csrf=") and "Secure" in cookie and "Path=/" in cookie
        assert "Domain" not in cookie
    finally:
        await client.close()


@pytest.mark.parametrize("value", ["é" * 32, "\u0000"])
async def test_non_ascii_login_csrf_is_403_not_500(store, value):  # noqa: F811  (review L5)
    client = await make_client(store, users=directory())
    try:
        client.session.cookie_jar.update_cookies({"inbox_login_csrf": "abc"})
        r = await client.post("/login", data={"username": "x", "password": "y", "csrf_token": value},
                              allow_redirects=False)
        assert r.status == 403
    finally:
        await client.close()


def test_one_account_cannot_evict_everyone_elses_sessions():
    """Review L7: 10,000 logins of one user used to push every other session out."""
    s = SessionStore(max_sessions=100, max_per_user=3)
    nurse, doc = User("nurse1", Role.NURSE, "x"), User("doc1", Role.PHYSICIAN, "y")
    tok, _ = s.create(doc)
    for _ in range(200):
        s.create(nurse)
    assert s.get(tok) is not None and len(s) == 4


async def test_live_streams_per_session_are_bounded(store):  # noqa: F811  (review L5)
    from monitor.inbox.views import MAX_STREAMS_PER_SESSION

    client = await make_client(store, users=directory())
    streams = []
    try:
        assert await attempt(client, "nurse1", PW["nurse1"]) == 303
        for _ in range(MAX_STREAMS_PER_SESSION):
            r = await client.get("/api/stream")
            assert r.status == 200
            await r.content.readuntil(b"\n\n")
            streams.append(r)
        assert (await client.get("/api/stream")).status == 429
        streams.pop().close()
        await asyncio.sleep(0.2)
        r = await client.get("/api/stream")
        assert r.status == 200
        streams.append(r)
    finally:
        for r in streams:
            r.close()
        await client.close()

