"""What the API test modules share: a fresh ``QKIT_HOME`` per module, and the schemathesis run.

``home`` (import it into a test module) is a fresh ``QKIT_HOME`` whose embedded
Redis is stopped after the module's servers.  :func:`fuzz_test` builds a test that sends generated requests to every
documented operation of a running ``qkit serve`` and checks each answer: no
5xx, and status, content type and body all as the document declares.
schemathesis's negative-data checks are left out: they misjudge requests with
extra headers.  Each module provides the ``api_schema`` fixture (:func:`schema_of`).
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import pytest
from hypothesis import HealthCheck, settings

from qkit.backends.embedded import EmbeddedServer

try:
    import schemathesis
    from schemathesis.checks import (content_type_conformance, not_a_server_error, response_schema_conformance,
                                     status_code_conformance)
except ImportError:  # the dev extra is not installed
    schemathesis = None


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    path = tmp_path_factory.mktemp("api-home")
    yield path
    EmbeddedServer(path).stop()  # after the module's servers (they depend on this fixture)


def running(home: Any, name: str, **env: str) -> Iterator[Any]:
    """For a fixture: ``yield from running(home, "name", VAR=value)`` serves ``home`` (log: ``name.log``
    next to it) for the fixture's scope."""
    from services import serve_home

    srv = serve_home(home, home.parent / f"{name}.log", **env)
    try:
        yield srv
    finally:
        srv.stop()


def schema_of(url: str) -> Any:
    """The OpenAPI document a server serves, loaded for schemathesis."""
    return schemathesis.openapi.from_url(f"{url}/api/openapi.json")


def fuzz_test(token_for: Callable[[Any], str], max_examples: int, path_regex: str | None = None) -> Callable[..., None]:
    """A test fuzzing every operation (or those whose path matches ``path_regex``) with the bearer
    ``token_for(case)`` (reads the ``api_schema`` fixture)."""
    if schemathesis is None:
        def skipped() -> None:
            pytest.skip("schemathesis is not installed (pip install -e '.[dev]')")
        return skipped

    lazy = schemathesis.pytest.from_fixture("api_schema")
    if path_regex is not None:
        lazy = lazy.include(path_regex=path_regex)

    @lazy.parametrize()
    @settings(max_examples=max_examples, deadline=None, suppress_health_check=list(HealthCheck))
    def fuzzed(case: Any) -> None:
        case.call_and_validate(headers={"Authorization": f"Bearer {token_for(case)}"}, timeout=60,
                               checks=[not_a_server_error, status_code_conformance, content_type_conformance,
                                       response_schema_conformance])

    return fuzzed
