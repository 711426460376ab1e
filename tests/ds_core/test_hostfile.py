"""DeepSpeed hostfile parsing and the include/exclude/num_nodes/num_gpus filters of ``ds run``."""

from __future__ import annotations

import pytest

from ds_core.cli.hostfile import filter_resources, parse_filter, parse_hostfile, read_hostfile
from ds_core.errors import LaunchError

POOL = {"worker-0": 4, "worker-1": 4, "worker-2": 2}


# -- parsing -----------------------------------------------------------------------------------


def test_parse_keeps_order_and_skips_comments_and_blank_lines():
    text = "# cluster\n\nworker-1 slots=4\n  worker-0   slots=8   # the big one\n\n"
    assert list(parse_hostfile(text).items()) == [("worker-1", 4), ("worker-0", 8)]


def test_read_hostfile_names_the_file_in_errors(tmp_path):
    path = tmp_path / "hosts"
    path.write_text("a slots=1\nb slots=two\n")
    with pytest.raises(LaunchError) as err:
        read_hostfile(str(path))
    assert f"{path}:2" in str(err.value)


def test_missing_hostfile():
    with pytest.raises(LaunchError, match=r"cannot read hostfile '/nonexistent/hosts'.*--hostfile"):
        read_hostfile("/nonexistent/hosts")


@pytest.mark.parametrize("line", ["worker-0", "worker-0 4", "worker-0 gpus=4", "slots=4",
                                  "worker-0 slots=4 extra"])
def test_bad_line(line):
    with pytest.raises(LaunchError) as err:
        parse_hostfile(f"ok slots=1\n{line}\n", source="hf")
    msg = str(err.value)
    assert f"hf:2: {line!r}" in msg
    assert "'hostname slots=N'" in msg  # the rule
    assert "comment it out" in msg  # the fix


@pytest.mark.parametrize("slots", ["0", "-1", "two", "1.5", "+2"])
def test_bad_slots(slots):
    with pytest.raises(LaunchError) as err:
        parse_hostfile(f"worker-0 slots={slots}\n", source="hf")
    msg = str(err.value)
    assert f"hf:1: 'worker-0 slots={slots}'" in msg
    assert f"slots={slots}" in msg and "positive integer" in msg
    assert "set slots to the number of processes" in msg


def test_duplicate_host():
    with pytest.raises(LaunchError) as err:
        parse_hostfile("a slots=1\nb slots=2\n\na slots=3\n", source="hf")
    msg = str(err.value)
    assert "hf:4: 'a slots=3'" in msg
    assert "'a' again (first at line 1)" in msg
    assert "merge the two lines" in msg


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_empty_hostfile(text):
    with pytest.raises(LaunchError, match=r"hf lists no hosts.*add a line per node"):
        parse_hostfile(text, source="hf")


# -- filter syntax -----------------------------------------------------------------------------


def test_parse_filter_syntax():
    assert parse_filter("a@b:0,2@c", "--include") == {"a": None, "b": [0, 2], "c": None}
    assert parse_filter("a:1@a:0", "--include") == {"a": [0, 1]}  # merged
    assert parse_filter("a@a:0", "--include") == {"a": None}  # all slots wins


@pytest.mark.parametrize("spec, fragment", [
    ("a@@b", "empty entry"),
    ("a@", "empty entry"),
    ("a:x", "slot 'x' of host 'a' is not a non-negative integer"),
    ("a:0,", "slot '' of host 'a'"),
    (":0", "no host name"),
    ("   ", "is empty"),
])
def test_bad_filter(spec, fragment):
    with pytest.raises(LaunchError) as err:
        parse_filter(spec, "--include")
    assert fragment in str(err.value)
    assert "--include" in str(err.value)


# -- filtering -----------------------------------------------------------------------------------


def test_no_filter_uses_every_slot():
    assert filter_resources(POOL) == {"worker-0": [0, 1, 2, 3], "worker-1": [0, 1, 2, 3],
                                      "worker-2": [0, 1]}


def test_include_hosts_and_slots_keeps_hostfile_order():
    active = filter_resources(POOL, include="worker-2@worker-0:1,3")
    assert list(active.items()) == [("worker-0", [1, 3]), ("worker-2", [0, 1])]


def test_exclude_hosts_and_slots():
    active = filter_resources(POOL, exclude="worker-1@worker-0:0,2")
    assert active == {"worker-0": [1, 3], "worker-2": [0, 1]}
    # excluding every slot of a host drops the host
    assert "worker-2" not in filter_resources(POOL, exclude="worker-2:0,1")


def test_exclude_everything_is_an_error():
    with pytest.raises(LaunchError, match="removes every slot"):
        filter_resources({"a": 1}, exclude="a")


def test_include_and_exclude_together():
    with pytest.raises(LaunchError) as err:
        filter_resources(POOL, include="worker-0", exclude="worker-1")
    msg = str(err.value)
    assert "--include 'worker-0' and --exclude 'worker-1'" in msg
    assert "cannot be combined" in msg and "keep one" in msg


@pytest.mark.parametrize("flag", ["include", "exclude"])
def test_unknown_host(flag):
    with pytest.raises(LaunchError) as err:
        filter_resources(POOL, **{flag: "worker-9:0"}, source="hf")
    msg = str(err.value)
    assert f"--{flag} names host 'worker-9', which is not in hf" in msg
    assert "did you mean" in msg
    assert "known hosts: worker-0, worker-1, worker-2" in msg


@pytest.mark.parametrize("flag", ["include", "exclude"])
def test_slot_out_of_range(flag):
    with pytest.raises(LaunchError) as err:
        filter_resources(POOL, **{flag: "worker-2:0,2"}, source="hf")
    msg = str(err.value)
    assert f"--{flag} asks for slot 2 on 'worker-2', which has slots=2 in hf" in msg
    assert "valid indices 0..1" in msg


def test_num_nodes_keeps_first_hosts_and_num_slots_caps():
    active = filter_resources(POOL, num_nodes=2, num_slots=3)
    assert active == {"worker-0": [0, 1, 2], "worker-1": [0, 1, 2]}
    # the cap applies after include: the first G of the chosen slots
    assert filter_resources(POOL, include="worker-0:1,2,3", num_slots=2) == {"worker-0": [1, 2]}
    # a host with fewer slots than the cap keeps what it has
    assert filter_resources(POOL, num_slots=3)["worker-2"] == [0, 1]


def test_num_nodes_too_many():
    with pytest.raises(LaunchError) as err:
        filter_resources(POOL, exclude="worker-1", num_nodes=3, source="hf")
    msg = str(err.value)
    assert "--num_nodes 3 but only 2 host(s)" in msg and "worker-0, worker-2" in msg


@pytest.mark.parametrize("kwargs", [{"num_nodes": 0}, {"num_slots": 0}])
def test_non_positive_counts(kwargs):
    with pytest.raises(LaunchError, match="positive integer"):
        filter_resources(POOL, **kwargs)
