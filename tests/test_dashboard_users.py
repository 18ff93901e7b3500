"""The dashboard for JWT users (per-user jobs, docs/http-api.md): a user signs in with their JWT and sees, reads and cancels
only their own jobs; the operator's pages are closed to them.

Against a real ``qkit serve`` on loopback with ``QKIT_API_JWKS_URL`` pointing at a local JWKS server; tokens are
signed by the keys of tests/test_api_jwt.py, as a sign-in service such as Clerk would.
"""
from __future__ import annotations

import re
import secrets

import httpx
import pytest

import qkit
from api_support import home, running  # noqa: F401 (home: a fixture)
from dashboard_helpers import sign_in
from test_api_jwt import AUDIENCE, ISSUER, JwksServer, alice, bob, token

ADMIN = "adm-" + secrets.token_hex(16)
METRICS = "met-" + secrets.token_hex(16)


@pytest.fixture(scope="module")
def jwks_server():
    srv = JwksServer()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def server(home, jwks_server):
    yield from running(home, "dash-users", QKIT_API_TOKEN=ADMIN, QKIT_METRICS_TOKEN=METRICS,
                       QKIT_API_JWKS_URL=jwks_server.url, QKIT_API_JWT_ISSUER=ISSUER, QKIT_API_JWT_AUDIENCE=AUDIENCE)


def create(server, bearer: str, **body) -> int:
    reply = httpx.post(f"{server.url}/api/jobs", headers={"Authorization": f"Bearer {bearer}"}, timeout=60,
                       json={"type": "web_scraping", "payload": {}, "delay": 3600, **body})
    assert reply.status_code == 201, reply.text
    return reply.json()["id"]


def ids_on(html: str) -> set[int]:
    return {int(i) for i in re.findall(r'<td class="n"><a href="/jobs/(\d+)">', html)}


def test_a_user_sees_reads_and_cancels_only_their_own_jobs(server, home):
    mine, theirs = create(server, alice()), create(server, bob())
    operators = create(server, ADMIN)
    with sign_in(server.url, alice()) as client:
        home_page = client.get("/").text
        assert "user user_alice" in home_page
        assert 'href="/dlq"' not in home_page and 'href="/runs"' not in home_page
        listed = ids_on(client.get("/jobs").text)
        assert mine in listed and theirs not in listed and operators not in listed
        assert client.get(f"/jobs/{theirs}").status_code == 404
        page = client.get(f"/jobs/{mine}")
        assert page.status_code == 200 and "Cancel job" in page.text and "Replay" not in page.text
        for path in ("/dlq", "/runs", "/schedules", "/limits", "/dlq/purge"):
            assert client.get(path).status_code == 403, path
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
        assert client.post(f"/jobs/{theirs}/cancel", data={"csrf": csrf}).status_code == 404
        assert client.post("/dlq/replay", data={"csrf": csrf, "all": "1"}).status_code == 403
        done = client.post(f"/jobs/{mine}/cancel", data={"csrf": csrf})
        assert done.status_code == 303 and done.headers["location"] == f"/jobs/{mine}?done=cancelled"
        assert "Cancelled." in client.get(done.headers["location"]).text
    with qkit.connect(home=home) as q:
        assert q.get(mine).status == "cancelled" and q.get(theirs).status == "pending"
        assert q.get(operators).status == "pending"


def test_the_overview_counts_a_users_jobs_only(server, home):
    create(server, bob())
    with sign_in(server.url, bob()) as client:
        rows = dict(re.findall(r'<tr data-queue="([^"]+)">(.*?)</tr>', client.get("/fragments/queues").text, re.S))
    delayed = int(re.findall(r'<td class="n">([^<]*)</td>', rows["default"])[2].replace(",", ""))
    with qkit.connect(home=home) as q:
        everyone = q.ledger.status_counts("default")["delayed"]
        bobs = len(q.ledger.find_jobs(owner="user_bob", status="pending"))
    assert delayed == bobs and 0 < bobs < everyone


def test_what_does_not_open_a_session(server):
    for bearer in (token("user_alice", exp_in=-60), token("user_alice", aud="someone-else"), METRICS, "x.y.z"):
        reply = httpx.post(f"{server.url}/login", data={"token": bearer})
        assert reply.status_code == 401 and "set-cookie" not in reply.headers
