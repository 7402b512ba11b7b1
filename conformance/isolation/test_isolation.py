"""Tenant isolation: ISO-1 .. ISO-4 (sentences in the checks module beside this file)."""

import pytest

pytestmark = pytest.mark.root


def test_iso_1_no_delivery_across_tenants(conformance) -> None:
    conformance("ISO-1")


def test_iso_2_foreign_tags_and_forged_nsh_dropped(conformance) -> None:
    conformance("ISO-2")


def test_iso_3_instances_see_only_their_tenant(conformance) -> None:
    conformance("ISO-3")


def test_iso_4_state_credentials_are_tenant_scoped(conformance) -> None:
    conformance("ISO-4")
