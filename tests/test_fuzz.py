"""Property-based bad input: schemathesis drives the running API from its own OpenAPI schema.

Whatever it sends, the API must answer without a 5xx (Temporal is up), with a status code and
a body that the schema documents.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from conftest import ADMIN_TOKEN


@pytest.fixture(scope="module")
def api_schema(api_url, worker):
    return schemathesis.openapi.from_url(f"{api_url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_documented_operation_holds_its_contract(case):
    case.call_and_validate(
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=30,
        # The API validates more than JSON Schema can say (email-validator refuses special-use
        # domains such as .test; request ids have a fixed shape), so some schema-valid input is
        # rightly refused with 422. Every other check stays on.
        excluded_checks=[positive_data_acceptance],
    )
