"""Schemathesis generates valid and invalid requests for every operation of the OpenAPI
spec; none may produce a 500. Bounded: a fixed number of examples per operation and mode.

The strategies are driven by Hypothesis directly (schemathesis' pytest plugin does not
support pytest 9), one operation and generation mode at a time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from serverkit import DOCS, fake_factory, upload

EXAMPLES = 25
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_no_input_gives_a_server_error(home: Path, fake_cls: type) -> None:
    from fastapi.testclient import TestClient

    from aiprime.config import load_settings
    from aiprime.server import create_app

    experts = [  # the routing endpoints run for real: one expert with documents, one without
        {"name": "docs", "collection": "default", "rerank": []},
        {"name": "ghost", "collection": "ghost", "rerank": []},
    ]
    s = load_settings(
        home,
        serve={"allow_no_auth": True, "max_upload_bytes": 64 * 1024},
        rerank={"stack": []},
        routing={"experts": experts},
    )
    app = create_app(s, fake_factory(fake_cls), multimodal=None)
    with TestClient(app, raise_server_exceptions=False) as client:  # the lifespan runs
        assert upload(client, DOCS).status_code == 200
        schema = schemathesis.openapi.from_asgi("/openapi.json", app)
        operations = [r.ok() for r in schema.get_all_operations()]
        assert len(operations) >= 15
        assert {"/v1/route/experts", "/v1/route/search", "/v1/route/feedback"} <= {
            op.path for op in operations
        }
        failures: list[str] = []
        statuses: set[int] = set()
        for op in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

                @given(case=op.as_strategy(generation_mode=mode))
                @settings(
                    max_examples=EXAMPLES,
                    deadline=None,
                    derandomize=True,
                    suppress_health_check=list(HealthCheck),
                    database=None,
                )
                def run(case: Any) -> None:
                    if case.query and "wait" in case.query:
                        case.query["wait"] = "false"  # waiting is bounded by the job
                    headers = dict(case.headers or {})
                    headers.pop("Content-Length", None)
                    case.headers = headers
                    kwargs = case.as_transport_kwargs(base_url="http://testserver")
                    kwargs.pop("app", None)
                    if not kwargs.get("cookies"):
                        kwargs.pop("cookies", None)
                    r = client.request(**kwargs)
                    statuses.add(r.status_code)
                    if r.status_code >= 500 and r.status_code != 501:
                        failures.append(
                            f"{case.operation.label} -> {r.status_code}: {r.text[:200]}"
                            f"\n  {case.as_curl_command()}"
                        )

                try:
                    run()
                except Unsatisfiable:  # nothing invalid to send (e.g. no parameters)
                    assert mode == GenerationMode.NEGATIVE, op.label
        assert not failures, "\n".join(failures[:10])
        assert statuses & {200, 201, 202, 204} and statuses & {400, 404, 413, 415, 422}


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-q"])
