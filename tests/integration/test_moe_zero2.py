"""MoE composed with ZeRO-2 through ds-core's seams (parameter tags, topology): trains on 2 ranks,
equals the run without ZeRO, and reloads across expert layouts."""

from tests.ds_moe.test_train import check_training_and_reload


def test_moe_gpt_trains_with_zero2_and_reloads_across_expert_layouts(distributed, tmp_path):
    check_training_and_reload(distributed, tmp_path, stage=2)
