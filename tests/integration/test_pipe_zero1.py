"""Pipeline × data parallelism with ZeRO stage 1 on the data axis, composed through ds-core's seams."""

from tests.ds_pipe.test_parity import check_two_stages_two_replicas_tied


def test_two_stages_two_replicas_zero1_tied():
    check_two_stages_two_replicas_tied({"zero_optimization": {"stage": 1}})
