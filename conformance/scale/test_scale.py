"""Zero-downtime scaling: SCALE-1, SCALE-2 (sentences in the checks module beside this file)."""

import pytest

pytestmark = pytest.mark.root


def test_scale_1_scale_out_under_load(conformance) -> None:
    conformance("SCALE-1")


def test_scale_2_scale_in_under_load(conformance) -> None:
    conformance("SCALE-2")
