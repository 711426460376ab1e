"""Real DeepSpeed configs from public projects: each keeps its recorded outcome (README.md here).

Every config DeepSpeed 0.19.5 accepts is accepted by ds, or refused with an error naming the feature
ds lacks — never "unknown key"; every config it rejects, and every planted mistake in broken/, is
rejected with the fix.
"""

import json
import re
import warnings

import pytest

from ds_core.config import parse_config
from ds_core.errors import ConfigError

from . import corpus

CORPUS = corpus.files("corpus")
EXPECTED = corpus.expected()
DEEPSPEED = json.loads((corpus.HERE / "expected.json").read_text())["deepspeed"]
BROKEN = json.loads((corpus.HERE / "broken" / "expected.json").read_text())["fixes"]


def _rel(path):
    return str(path.relative_to(corpus.HERE))


def test_every_corpus_file_has_a_recorded_outcome_and_a_source():
    names = {_rel(p) for p in CORPUS}
    assert len(names) >= 200
    assert names == set(EXPECTED) == set(DEEPSPEED)
    readme = (corpus.HERE / "README.md").read_text()
    missing = [n for n in names if f"`{n[len('corpus/'):]}`" not in readme]
    assert not missing, f"README.md lists no source for {missing}"


@pytest.mark.parametrize("path", CORPUS, ids=_rel)
def test_real_config_keeps_its_outcome(path):
    expectation = EXPECTED[_rel(path)]
    kind, message, notes = corpus.outcome(corpus.as_used(json.loads(path.read_text())))
    if expectation == "accept":
        assert kind == "accept", message
        given = json.dumps(json.loads(path.read_text()))
        for note in notes:  # every warning names a key the config really has
            names = re.findall(r"(?:DeepSpeed key|unknown key) '?([\w.]+)", note) or re.findall(r"^.*?: (\w+) ", note)
            assert names and all(f'"{n.rsplit(".", 1)[-1]}"' in given for n in names), note
    else:
        verdict, text = expectation.split(": ", 1)
        assert kind == "error", f"expected {verdict} naming {text!r}, but the config was accepted"
        assert text in message, message


def test_deepspeed_valid_configs_are_never_refused_as_unknown():
    """The rule: a config DeepSpeed accepts is accepted or refused by feature, not by key."""
    for rel, verdict in DEEPSPEED.items():
        if verdict == "accepts":
            assert not EXPECTED[rel].startswith("reject"), rel
    accepted = sum(1 for rel, v in DEEPSPEED.items() if v == "accepts" and EXPECTED[rel] == "accept")
    assert accepted >= 174


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_planted_mistake_is_rejected_with_the_fix(name):
    path = corpus.HERE / "broken" / name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ConfigError) as err:
            parse_config(str(path), data_parallel_size=2)
    assert BROKEN[name] in str(err.value)
    assert str(path) in str(err.value)  # the file is named


def test_broken_configs_are_one_mistake_away_from_valid():
    """The base every planted mistake starts from is itself accepted."""
    base = json.loads((corpus.HERE / "broken" / "typo_bp16.json").read_text())
    base["bf16"] = base.pop("bp16")
    with pytest.warns(UserWarning, match="'zero_optimization.round_robin_gradients' is accepted but has no effect"):
        parse_config(base, data_parallel_size=2)
