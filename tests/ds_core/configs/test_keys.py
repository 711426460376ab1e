"""The table of DeepSpeed's keys (ds_core/config/deepspeed_keys.json): complete, consistent, and obeyed.

Every key in it is tried with a value that asks for its behaviour: a handled key parses without a
warning and shows in the parsed config, a key without effect gives exactly one warning naming it, a
refused key fails naming the feature, and a package's section needs that package.
"""

import copy
import warnings

import pytest

from ds_core import plugins
from ds_core.config import ConfigWarning, DSConfig, key_table, parse_config
from ds_core.config.keys import children, edit_distance, near_miss, triggers
from ds_core.errors import ConfigError

from . import corpus

TABLE = key_table().entries
BASE = {"train_batch_size": 8}
# Sibling values a nested key needs to be meaningful (ZeRO offload keys act at stage 3 with offload on).
CONTEXT = {
    "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}},
    "optimizer": {"type": "AdamW"}, "scheduler": {"type": "WarmupLR"},
}
# Values that ask for a key's behaviour where the table's inert values do not make one obvious.
TRIGGER = {
    "log_level": "info", "data_types.grad_accum_dtype": "bf16", "data_types.param_dtype": "bf16",
    "data_types.buffer_dtype": "bf16", "checkpoint.tag_validation": "Fail", "checkpoint.writer": {"type": "fast"},
    "datastates_ckpt": {"enabled": True}, "sparse_attention": {"mode": "fixed"}, "compile": {"deepcompile": True},
    "gradient_allreduce_op": "sum", "zero_optimization.zenflow": {"topk_ratio": 0.05},
    "zero_optimization.leaf_module": {"classes": ["MyBlock"]}, "zero_optimization.zeropp_loco_param": {"err_beta": 0.8},
    "zero_optimization.zero_hpz_partition_size": 2, "zero_optimization.mics_shard_size": 2,
    "zero_optimization.stage3_model_persistence_threshold": 1000, "zero_optimization.stage3_module_granularity_threshold": 10,
    "zero_optimization.offload_param.max_in_cpu": 5, "zero_optimization.offload_optimizer.ratio": 0.5,
    "zero_optimization.offload_optimizer.cpuadam_cores_perc": 0.5, "pipeline.seed_fn": "seed_layer",
}
# Values for handled keys whose default does not stand alone.
EXAMPLE = {
    "zero_optimization.stage": 3, "zero_optimization.offload_optimizer.device": "cpu",
    "zero_optimization.offload_param.device": "cpu", "zero_optimization.offload_optimizer.nvme_path": "/tmp",
    "zero_optimization.offload_param.nvme_path": "/tmp", "optimizer.type": "AdamW", "optimizer.params": {"lr": 1e-3},
    "scheduler.type": "WarmupLR", "scheduler.params": {"warmup_num_steps": 10}, "train_batch_size": 8,
    "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "seed": 1, "vocabulary_size": 50304,
    "communication_data_type": "bf16", "data_parallel_size": 1, "pipeline.stages": 2, "pipeline.partition_method": "uniform",
    "zero_optimization.overlap_comm": True, "zero_optimization.stage3_hang_timeout": 60.0,
    "zero_optimization.cpu_offload": True, "zero_optimization.cpu_offload_params": True,
    "zero_optimization.cpu_offload_use_pin_memory": True, "seq_parallel_communication_data_type": "bf16",
    "wandb.group": "g", "wandb.team": "t", "activation_checkpointing.number_checkpoints": 4,
    "bfloat16": {"enabled": True}, "aio.intra_op_parallelism": 4, "zero_optimization.cpu_offload_param": True,
    "zero_optimization.gather_16bit_weights_on_model_save": True, "zero_optimization.use_all_reduce_for_fetch_params": False,
    "zero_optimization.allgather_sequential": False, "zero_optimization.module_granularity_threshold": 0,
    "zero_optimization.model_persistence_threshold": 9223372036854775807,
}


def _value(e):
    if e.path in TRIGGER:
        return TRIGGER[e.path]
    if e.status == "package":
        return {}
    if e.status == "alias":
        return EXAMPLE.get(e.path, 1000)
    if e.status in ("handled", "alias"):
        return EXAMPLE.get(e.path, e.default)
    if e.when == "enabled":
        return {"enabled": True}
    inert = e.inert if e.inert is not None else (e.default,)
    if all(isinstance(v, bool) for v in inert):
        return not inert[0]
    raise AssertionError(f"no trigger value for {e.path}: add one to TRIGGER")


def _config(path, value):
    config = copy.deepcopy(BASE)
    parts = path.split(".")
    node = config
    for i, part in enumerate(parts[:-1]):
        node = node.setdefault(part, copy.deepcopy(CONTEXT.get(".".join(parts[:i + 1]), {})))
    node[parts[-1]] = value
    if path.startswith("zero_optimization.cpu_offload"):
        config["zero_optimization"] = {"stage": 3, "cpu_offload": True, parts[-1]: value}
    return config


def _parse(config):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        parsed = parse_config(config)
    return parsed, [str(w.message) for w in caught if issubclass(w.category, ConfigWarning)]


def _installed(dist):
    return any(spec.dist == dist for spec in plugins.features().values())


def _owner_installed(path):
    if "." not in path:
        return True
    top = path.split(".")[0]
    e = TABLE.get(top)
    return e is None or e.status != "package" or plugins.feature_for_section(top) is not None


LEAVES = [e for e in TABLE.values() if e.status not in ("section",)]


@pytest.mark.parametrize("e", LEAVES, ids=lambda e: e.path)
def test_every_key_is_handled_warned_or_refused_by_name(e):
    if not _owner_installed(e.path):
        pytest.skip(f"the package owning {e.path.split('.')[0]} is not installed here (its refusal is tested below)")
    value = _value(e)
    config = _config(e.path, value)
    if e.status == "package":
        if plugins.feature_for_section(e.path) is not None:
            parse_config(config)
        else:
            with pytest.raises(ConfigError, match=rf"section '{e.path}' (needs|belongs to) the {e.by}|section '{e.path}' belongs to {e.by}"):
                parse_config(config)
        return
    if e.status == "refused":
        with pytest.raises(ConfigError, match="asks for") as err:
            parse_config(config)
        assert e.feature in str(err.value) and e.path in str(err.value)
        return
    if e.needs and triggers(e, value) and not _installed(e.needs):
        with pytest.raises(ConfigError, match=rf"{e.path} = .* needs the {e.needs} package"):
            parse_config(config)
        return
    parsed, notes = _parse(config)
    if e.status == "no_effect":
        assert len([n for n in notes if repr(e.path) in n]) == 1, notes
        assert "has no effect" in notes[0]
        return
    assert not notes, notes  # handled keys and aliases give no warning
    view = parsed.to_dict()
    if e.status == "alias":  # read as its key: the key's value is in effect
        target = e.parent + "." + e.alias_of if e.parent else e.alias_of
        if TABLE[target].status in ("handled", "section"):
            node = view
            for part in target.split("."):
                node = node[part]
        return
    node = view
    for part in e.path.split("."):
        assert part in node, f"{e.path} missing from the parsed config"
        node = node[part]


def test_no_effect_keys_at_their_inert_values_are_silent():
    for e in TABLE.values():
        if e.status != "no_effect" or e.when != "changed" or not _owner_installed(e.path):
            continue
        for value in e.inert if e.inert is not None else (e.default,):
            _, notes = _parse(_config(e.path, value))
            assert not notes, (e.path, value, notes)


def test_table_covers_every_deepspeed_key():
    known = set(TABLE)
    for e in TABLE.values():
        known |= {f"{e.path}.{k}" for k in (*e.keys, *e.defaults)}
    lines = (corpus.HERE / "deepspeed_0_19_keys.txt").read_text().splitlines()
    missing = [k for k in lines if k and not k.startswith("#") and k not in known]
    assert not missing, f"DeepSpeed keys the table does not list: {missing}"


def test_table_matches_the_models():
    """Every ds-core field is in the table; every key the table hands to a model is a field of it."""
    top = children("")
    fields = set(DSConfig.model_fields)
    assert fields <= set(top)
    for name, e in top.items():
        if e.status == "handled" and e.by == "ds-core" and name not in (
                "vocabulary_size", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer"):
            assert name in fields, name
    for section in ("zero_optimization", "pipeline"):
        spec = plugins.feature_for_section(section)
        if spec is None:
            continue
        model = spec.load_config_model()
        for name, e in children(section).items():
            if e.status in ("handled", "section"):
                assert name in model.model_fields, f"{section}.{name} is handled but {model.__name__} lacks it"


@pytest.mark.parametrize("key, valid, expected", [
    ("bp16", {"bf16", "fp16"}, "bf16"),
    ("stage3_param_persitence_threshold", {"stage3_param_persistence_threshold"}, "stage3_param_persistence_threshold"),
    ("FP16", {"fp16"}, None),  # two edits on a four-letter key: not a near miss
    ("Fp16", {"fp16"}, "fp16"),
    ("zero_optimisation", {"zero_optimization"}, "zero_optimization"),
    ("reduce_bucket", {"reduce_bucket_size"}, None),
    ("logging", {"log_level", "amp"}, None),
    ("cuda_visible_devices", {"communication_data_type"}, None),
])
def test_near_miss(key, valid, expected):
    assert near_miss(key, valid) == expected


def test_edit_distance_counts_adjacent_swaps_once():
    assert edit_distance("stagse", "stages") == 1
    assert edit_distance("abc", "abc") == 0
    assert edit_distance("", "ab") == 2


def test_comments_are_ignored_at_any_depth():
    config = {"_comment": "zero 2", "train_batch_size": 8, "_read_the_docs": "https://www.deepspeed.ai",
              "zero_optimization": {"stage": 2, "_note": "tuned", "offload_optimizer": {"_why": "memory",
                                                                                       "device": "cpu"}},
              "fp16": {"_": 1, "enabled": False}}
    parsed, notes = _parse(config)
    assert not notes
    assert "_comment" not in parsed and "_note" not in parsed["zero_optimization"]
    assert parsed.section("zero_optimization").offload_optimizer.device == "cpu"


def test_unknown_top_level_key_warns_once_naming_it():
    parsed, notes = _parse({"train_batch_size": 8, "logging": {"level": "info"}, "cuda_visible_devices": "0,1",
                            "comms_config": {"x": 1}})
    for key in ("logging", "cuda_visible_devices", "comms_config"):
        assert len([n for n in notes if f"unknown key {key} is ignored" in n]) == 1
    assert "logging" in parsed and parsed["logging"] == {"level": "info"}  # kept as given, as DeepSpeed does


def test_unknown_key_in_a_section_deepspeed_checks_is_an_error():
    with pytest.raises(ConfigError, match=r"unknown config key fp16.'dynamic' : it is not a key of 'fp16'".replace(" :", ":")):
        parse_config({"train_batch_size": 8, "fp16": {"enabled": True, "dynamic": True}})
    with pytest.raises(ConfigError, match=r"zero_optimization.'offload_device' .*not a key"):
        parse_config({"train_batch_size": 8, "zero_optimization": {"stage": 2, "offload_device": "cpu"}})


def test_unknown_key_in_a_section_deepspeed_reads_loosely_warns():
    _, notes = _parse({"train_batch_size": 8, "activation_checkpointing": {"use_reentrant": False}})
    assert len(notes) == 1 and "unknown key activation_checkpointing.use_reentrant is ignored" in notes[0]


def test_a_key_of_another_section_is_named():
    with pytest.raises(ConfigError, match=r"bf16.'loss_scale': it is not a key of 'bf16' \(it is a key of amp / fp16\)"):
        parse_config({"train_batch_size": 8, "bf16": {"enabled": True, "loss_scale": 0}})
    _, notes = _parse({"train_batch_size": 8, "stage": 2})
    assert "(it is a key of zero_optimization)" in notes[0]


def test_other_spellings_are_read_as_their_key():
    assert parse_config({"train_batch_size": 8, "bfloat16": {"enabled": True}}).precision == "bf16"
    assert parse_config({"train_batch_size": 8, "aio": {"intra_op_parallelism": 4}}).aio.thread_count == 4
    with pytest.raises(ConfigError, match="both aio.intra_op_parallelism and aio.thread_count"):
        parse_config({"train_batch_size": 8, "aio": {"intra_op_parallelism": 4, "thread_count": 2}})
    zero = parse_config({"train_batch_size": 8, "zero_optimization": {"stage": 3, "prefetch_bucket_size": 1000}})
    assert zero.section("zero_optimization").stage3_prefetch_bucket_size == 1000
    assert parse_config({"train_batch_size": 8, "zero_optimization": True}).section("zero_optimization").stage == 1


def test_zero_plus_plus_is_handled_and_zenflow_accepted_with_one_warning():
    zero = {"stage": 3, "zero_hpz_partition_size": 8, "zero_quantized_weights": True, "zero_quantized_gradients": True,
            "offload_optimizer": {"device": "cpu"}, "zenflow": {"topk_ratio": 0.05, "update_interval": 4}}
    parsed, notes = _parse({"train_batch_size": 8, "zero_optimization": zero})
    assert len([n for n in notes if "'zero_optimization.zenflow'" in n]) == 1
    for key in ("zero_hpz_partition_size", "zero_quantized_weights", "zero_quantized_gradients"):
        assert not [n for n in notes if f"'zero_optimization.{key}'" in n], key
    section = parsed.section("zero_optimization")  # ds-zero's ZeRO++ (tests/ds_zero/test_zeropp*.py)
    assert section.zero_quantized_weights is True and section.zero_hpz_partition_size == 8


def test_offload_param_below_stage_3_is_ignored_with_a_warning_as_in_deepspeed():
    parsed, notes = _parse({"train_batch_size": 8, "zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}})
    assert parsed.section("zero_optimization").offload_param.device == "none"
    assert len(notes) == 1 and "acts only with zero_optimization.stage 3" in notes[0]
    _, notes = _parse({"train_batch_size": 8, "zero_optimization": {"stage": 2, "offload_param": {"device": "none"}}})
    assert not notes


def test_reduce_bucket_size_zero_is_accepted():
    zero = parse_config({"train_batch_size": 8, "zero_optimization": {"stage": 2, "reduce_bucket_size": 0}})
    assert zero.section("zero_optimization").reduce_bucket_size == 0


def test_new_top_level_keys_are_in_the_core_model():
    parsed = parse_config({"train_batch_size": 8, "sequence_parallel_size": 1,
                           "seq_parallel_communication_data_type": "BF16"})
    assert parsed.sequence_parallel_size == 1 and parsed.seq_parallel_communication_data_type == "bf16"
    if not _installed("ds-parallel"):
        with pytest.raises(ConfigError, match="sequence_parallel_size = 2 needs the ds-parallel package"):
            parse_config({"train_batch_size": 8, "sequence_parallel_size": 2})


def test_data_parallel_size_must_match_the_launch():
    with pytest.raises(ConfigError, match="data_parallel_size 4 in the config != 2 data-parallel ranks"):
        parse_config({"train_micro_batch_size_per_gpu": 2, "data_parallel_size": 4}, data_parallel_size=2)
    assert parse_config({"train_micro_batch_size_per_gpu": 2, "data_parallel_size": 2},
                        data_parallel_size=2).batch.train_batch_size == 4


def test_vocabulary_size_warns_like_deepspeed():
    _, notes = _parse({"train_batch_size": 8, "vocabulary_size": 50257})
    assert len(notes) == 1 and "pad the vocabulary to 50264" in notes[0]
    assert not _parse({"train_batch_size": 8, "vocabulary_size": 50304})[1]


def test_feature_section_of_an_installed_package_that_does_not_read_it(monkeypatch):
    from ds_core.config import screen

    monkeypatch.setattr(screen, "_installed_without", lambda dist, section: True)
    monkeypatch.setattr(plugins, "feature_for_section", lambda section: None)
    with pytest.raises(ConfigError, match="section 'inference' belongs to ds-infer, which is installed but does not"):
        parse_config({"train_batch_size": 8, "inference": {"dtype": "fp16"}})
