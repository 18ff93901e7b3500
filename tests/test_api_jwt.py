"""Per-user jobs: bearer JWTs verified against a JWKS, against real ``qkit serve`` processes on loopback.

The test makes an RSA and an EC (P-256) key with ``cryptography``, serves
their public halves as a JWKS from a local HTTP server it starts, and signs
tokens with PyJWT, as a sign-in service such as Clerk would.  ``server``
checks issuer and audience; ``open_server`` has neither configured;
``dark_server`` points at a JWKS that does not answer.
"""
from __future__ import annotations

import json
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from qkit.ports import free_port
from api_support import home, running  # noqa: F401 (home: a fixture)
from services import ApiServer, serve_home

ADMIN = "adm-" + secrets.token_hex(16)
ISSUER = "https://clerk.example.test"
AUDIENCE = "qkit-tests"

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)  # never published


def jwks() -> dict:
    rsa_jwk = RSAAlgorithm.to_jwk(RSA_KEY.public_key(), as_dict=True) | {"kid": "rsa-1", "alg": "RS256", "use": "sig"}
    ec_jwk = ECAlgorithm.to_jwk(EC_KEY.public_key(), as_dict=True) | {"kid": "ec-1", "alg": "ES256", "use": "sig"}
    return {"keys": [rsa_jwk, ec_jwk]}


class JwksServer:
    """The JWKS on a local HTTP server (counts its fetches)."""

    def __init__(self) -> None:
        body = json.dumps(jwks()).encode()
        owner = self
        self.fetches = 0

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server name
                owner.fetches += 1
                self.send_response(200 if self.path == "/.well-known/jwks.json" else 404)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/.well-known/jwks.json"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def token(sub: str | None = "alice", *, key=RSA_KEY, alg: str = "RS256", kid: str | None = "rsa-1",
          exp_in: int = 300, **claims) -> str:
    body = {"iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + exp_in, "iat": int(time.time()), **claims}
    if sub is not None:
        body["sub"] = sub
    body = {k: v for k, v in body.items() if v is not None}
    return jwt.encode(body, key, algorithm=alg, headers={"kid": kid} if kid else None)


def alice() -> str:
    return token("user_alice")


def bob() -> str:
    return token("user_bob", key=EC_KEY, alg="ES256", kid="ec-1")


# --------------------------------------------------------------------------- servers
@pytest.fixture(scope="module")
def jwks_server():
    srv = JwksServer()
    yield srv
    srv.stop()


def start_server(home: Path, name: str, env_extra: dict[str, str]) -> ApiServer:
    return serve_home(home, home.parent / f"{name}.log", QKIT_API_TOKEN=ADMIN, **env_extra)


@pytest.fixture(scope="module")
def server(home, jwks_server):
    yield from running(home, "jwt", QKIT_API_TOKEN=ADMIN, QKIT_API_JWKS_URL=jwks_server.url,
                       QKIT_API_JWT_ISSUER=ISSUER, QKIT_API_JWT_AUDIENCE=AUDIENCE)


def call(server: ApiServer, method: str, path: str, bearer: str, **kwargs) -> httpx.Response:
    return httpx.request(method, server.url + path, headers={"Authorization": f"Bearer {bearer}"}, timeout=60,
                         **kwargs)


def create(server: ApiServer, bearer: str, **body) -> int:
    reply = call(server, "POST", "/api/jobs", bearer, json={"type": "jwt.probe", "payload": {}, "delay": 3600, **body})
    assert reply.status_code == 201, reply.text
    return reply.json()["id"]


# --------------------------------------------------------------------------- users and their jobs
def test_users_see_read_and_list_only_their_own_jobs(server):
    mine = [create(server, alice()) for _ in range(2)]
    theirs = create(server, bob())  # ES256
    admins = create(server, ADMIN)

    assert call(server, "GET", f"/api/jobs/{mine[0]}", ADMIN).json()["owner"] == "user_alice"
    assert call(server, "GET", f"/api/jobs/{theirs}", ADMIN).json()["owner"] == "user_bob"
    assert call(server, "GET", f"/api/jobs/{admins}", ADMIN).json()["owner"] is None

    listed = call(server, "GET", "/api/jobs", alice(), params={"type": "jwt.probe"}).json()["jobs"]
    assert [j["id"] for j in listed] == sorted(mine, reverse=True)
    assert [j["id"] for j in call(server, "GET", "/api/jobs", bob(), params={"type": "jwt.probe"}).json()["jobs"]] \
        == [theirs]
    everyone = call(server, "GET", "/api/jobs", ADMIN, params={"type": "jwt.probe"}).json()["jobs"]
    assert {j["id"] for j in everyone} >= {*mine, theirs, admins}

    assert call(server, "GET", f"/api/jobs/{mine[0]}", alice()).json()["owner"] == "user_alice"
    # another user's job answers exactly as a job that does not exist
    other = call(server, "GET", f"/api/jobs/{theirs}", alice())
    missing = call(server, "GET", "/api/jobs/999999999", alice())
    assert (other.status_code, missing.status_code) == (404, 404)
    assert other.json()["error"] == f"no job {theirs} in queue 'default'"
    assert call(server, "GET", f"/api/jobs/{admins}", bob()).status_code == 404


def test_users_cancel_only_their_own_jobs(server):
    mine, theirs = create(server, alice()), create(server, bob())
    refused = call(server, "POST", f"/api/jobs/{theirs}/cancel", alice())
    assert refused.status_code == 404 and refused.json()["error"] == f"no job {theirs} in queue 'default'"
    assert call(server, "GET", f"/api/jobs/{theirs}", ADMIN).json()["status"] == "pending"  # untouched
    done = call(server, "POST", f"/api/jobs/{mine}/cancel", alice())
    assert done.status_code == 200 and done.json() == {"id": mine, "status": "cancelled"}
    assert call(server, "POST", f"/api/jobs/{mine}/cancel", alice()).status_code == 409  # already finished


def test_idempotency_keys_do_not_cross_users(server):
    key = "k-" + secrets.token_hex(6)
    first = create(server, alice(), key=key)
    again = call(server, "POST", "/api/jobs", alice(), json={"type": "jwt.probe", "payload": {}, "key": key})
    assert again.status_code == 200 and again.json() == {"id": first, "status": "pending", "duplicate": True}
    crossed = call(server, "POST", "/api/jobs", bob(), json={"type": "jwt.probe", "payload": {}, "key": key})
    assert crossed.status_code == 409 and str(first) not in crossed.text  # bob learns no id
    assert call(server, "GET", f"/api/jobs/{first}", ADMIN).json()["owner"] == "user_alice"  # unchanged
    assert first not in [j["id"] for j in call(server, "GET", "/api/jobs", bob()).json()["jobs"]]


def test_users_stay_out_of_the_operator_routes(server):
    for path in ("/api/queues", "/api/stats", "/api/runs", "/metrics"):
        reply = call(server, "GET", path, alice())
        assert reply.status_code == 403 and "own jobs" in reply.json()["error"], path
    assert call(server, "POST", "/api/workers", alice()).status_code in (401, 503)


# --------------------------------------------------------------------------- tokens that do not verify
def forged_hs256() -> str:
    """HS256 under the RSA key's kid: the algorithm confusion a JWKS client must refuse."""
    return jwt.encode({"sub": "user_mallory", "iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + 300},
                      "not-the-key-" + secrets.token_hex(16), algorithm="HS256", headers={"kid": "rsa-1"})


BAD_TOKENS = {
    "expired": lambda: token(exp_in=-120),
    "wrong issuer": lambda: token(iss="https://mallory.example.test"),
    "no issuer": lambda: token(iss=None),
    "wrong audience": lambda: token(aud="someone-else"),
    "no audience": lambda: token(aud=None),
    "no exp": lambda: jwt.encode({"sub": "user_alice", "iss": ISSUER, "aud": AUDIENCE}, RSA_KEY,
                                 algorithm="RS256", headers={"kid": "rsa-1"}),
    "no sub": lambda: token(sub=None),
    "empty sub": lambda: token(sub=""),
    "sub too long": lambda: token(sub="u" * 257),
    "key not in the JWKS": lambda: token(key=OTHER_RSA),
    "unknown kid": lambda: token(kid="rsa-9"),
    "no kid": lambda: token(kid=None),
    "RS256 signature under the EC kid": lambda: token(kid="ec-1"),
    "ES256 signature under the RSA kid": lambda: token(key=EC_KEY, alg="ES256", kid="rsa-1"),
    "HS256 (algorithm confusion)": forged_hs256,
    "alg none": lambda: jwt.encode({"sub": "user_alice", "iss": ISSUER, "aud": AUDIENCE,
                                    "exp": int(time.time()) + 300}, None, algorithm="none", headers={"kid": "rsa-1"}),
    "RS384 (not accepted)": lambda: token(alg="RS384"),
    "tampered payload": lambda: ".".join([alice().split(".")[0], token("user_mallory").split(".")[1],
                                          alice().split(".")[2]]),
    "garbage": lambda: "a.b.c",
}


@pytest.mark.parametrize("case", sorted(BAD_TOKENS))
def test_tokens_that_do_not_verify_are_401_in_one_line(server, case):
    bearer = BAD_TOKENS[case]()
    for method, path in (("GET", "/api/jobs"), ("POST", "/api/jobs"), ("GET", "/api/jobs/1")):
        reply = call(server, method, path, bearer, json={"type": "jwt.probe", "payload": {}})
        assert reply.status_code == 401, (case, method, path, reply.text)
        assert reply.json() == {"error": "missing or invalid credentials"}
        assert reply.headers["www-authenticate"].startswith("Bearer")


def test_jwks_is_fetched_once_and_cached(server, jwks_server):
    before = jwks_server.fetches
    for _ in range(5):
        assert call(server, "GET", "/api/jobs", alice(), params={"limit": 1}).status_code == 200
    assert jwks_server.fetches - before <= 1


# --------------------------------------------------------------------------- configuration
def test_without_issuer_and_audience_any_iss_and_aud_pass(home, jwks_server):
    srv = start_server(home, "jwt-open", {"QKIT_API_JWKS_URL": jwks_server.url})
    try:
        for bearer in (token("user_carol", iss="https://anyone.test", aud="anything"),
                       token("user_carol", iss=None, aud=None)):
            assert call(srv, "GET", "/api/jobs", bearer).status_code == 200
        assert call(srv, "GET", "/api/jobs", token("user_carol", exp_in=-120)).status_code == 401
    finally:
        srv.stop()


def test_an_unreachable_jwks_is_a_503_for_users_only(home):
    dark = f"http://127.0.0.1:{free_port()}/.well-known/jwks.json"  # nothing listens there
    srv = start_server(home, "jwt-dark", {"QKIT_API_JWKS_URL": dark})
    try:
        reply = call(srv, "GET", "/api/jobs", alice())
        assert reply.status_code == 503 and "JWKS" in reply.json()["error"]
        assert "127.0.0.1" not in reply.text  # the URL is not echoed
        assert call(srv, "GET", "/api/jobs", ADMIN).status_code == 200  # static tokens never need the JWKS
        assert call(srv, "GET", "/api/jobs", "not-a-jwt").status_code == 401
    finally:
        srv.stop()
    log = (home.parent / "jwt-dark.log").read_text(errors="replace")
    assert "the JWKS of QKIT_API_JWKS_URL cannot be fetched" in log  # the reason is in the server's log
    assert "eyJ" not in log  # and no token (a JWT's base64 header starts so)


def test_jwks_alone_opens_the_jobs_routes_to_users_only(home, jwks_server):
    srv = serve_home(home, home.parent / "jwt-only.log", QKIT_API_JWKS_URL=jwks_server.url)  # no static token
    try:
        assert call(srv, "GET", "/api/jobs", alice()).status_code == 200
        assert call(srv, "GET", "/api/jobs", ADMIN).status_code == 401
        assert call(srv, "GET", "/api/queues", alice()).status_code == 503  # no operator token is set
    finally:
        srv.stop()


def test_logs_hold_no_token(server, home):
    assert call(server, "GET", "/api/jobs", alice()).status_code == 200
    assert call(server, "GET", "/api/jobs", token(exp_in=-120)).status_code == 401
    log = (home.parent / "jwt.log").read_text(errors="replace")
    assert "GET /api/jobs 401" in log and "GET /api/jobs 200" in log  # the log is real
    assert "eyJ" not in log and ADMIN not in log
