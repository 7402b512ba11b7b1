"""State continuity across instance crashes: CONT-1 .. CONT-6 (sentences in the checks module beside this file)."""

import pytest

pytestmark = pytest.mark.root


def test_cont_1_kill_breaks_no_connection(conformance) -> None:
    conformance("CONT-1")


def test_cont_2_firewall_connections_survive(conformance) -> None:
    conformance("CONT-2")


def test_cont_3_nat_mapping_survives(conformance) -> None:
    conformance("CONT-3")


def test_cont_4_ipsec_sequence_and_replay(conformance) -> None:
    conformance("CONT-4")


def test_cont_5_lb_backend_survives(conformance) -> None:
    conformance("CONT-5")


def test_cont_6_state_primary_failover(conformance) -> None:
    conformance("CONT-6")
