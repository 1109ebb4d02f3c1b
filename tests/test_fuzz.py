"""Property-based bad input: schemathesis drives the running API from its own OpenAPI schema.

Whatever it sends, the API must answer without a 5xx (Temporal is up), with a status code and
a body that the schema documents.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.generation.meta import ParameterLocation
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance

from conftest import ADMIN_TOKEN


@pytest.fixture(scope="module")
def api_schema(api_url, worker):
    return schemathesis.openapi.from_url(f"{api_url}/openapi.json")


# The audit export reads every request workflow of its window, asking each one's worker. This
# session leaves hundreds of workflows whose test workers are gone, so each call would spend its
# whole time budget (api/audit.py); tests/test_telemetry.py exercises it instead.
schema = schemathesis.pytest.from_fixture("api_schema").exclude(path="/api/admin/audit")


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_documented_operation_holds_its_contract(case):
    meta = case.meta
    # The API validates more than JSON Schema can say (email-validator refuses special-use
    # domains such as .test; request ids have a fixed shape), so some schema-valid input is
    # rightly refused with 422.
    excluded = [positive_data_acceptance]
    if meta is not None and meta.is_negative_at(ParameterLocation.QUERY):
        # Unknown query parameters are ignored, as by most HTTP APIs; invalid values of known
        # ones are still refused (tests/test_api.py, test_approval.py).
        excluded.append(negative_data_rejection)
    headers = {}
    if meta is None or not meta.is_negative_at(ParameterLocation.HEADER):
        # Admin operations need the token; a case that tests a broken header keeps its own.
        headers["Authorization"] = f"Bearer {ADMIN_TOKEN}"
    case.call_and_validate(headers=headers, timeout=30, excluded_checks=excluded)
