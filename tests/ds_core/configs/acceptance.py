"""Prints how ds fares on the corpus of public DeepSpeed configs: accepted, refused naming a feature ds
lacks, or rejected as broken with the fix (see README.md in this directory).

    python tests/ds_core/configs/acceptance.py                 # this checkout
    python tests/ds_core/configs/acceptance.py --verbose       # one line per file

To measure another ds (e.g. before a change), write the configs as the Trainer hands them over with
this checkout, then parse them with the other one:

    python tests/ds_core/configs/acceptance.py --write-used /tmp/used
    PYTHONPATH=<other checkout>/packages/ds-core/src:<...>/ds-zero/src:<...>/ds-pipe/src:<...>/ds-moe/src \\
        python tests/ds_core/configs/acceptance.py --parse-dir /tmp/used
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import corpus  # noqa: E402


def _judge(kind: str, message: str, expectation: str | None) -> str:
    if kind == "accept":
        return "accepted"
    if expectation and expectation.startswith("refuse: ") and expectation[8:] in message:
        return "refused by feature"
    if expectation and expectation.startswith("reject: ") and expectation[8:] in message:
        return "rejected with the fix"
    return "error"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--write-used", metavar="DIR", help="write each config as used (auto filled) to DIR")
    parser.add_argument("--parse-dir", metavar="DIR", help="parse the configs written by --write-used")
    args = parser.parse_args()
    expected = corpus.expected()
    paths = corpus.files("corpus")
    if args.write_used:
        out = Path(args.write_used)
        for path in paths:
            rel = path.relative_to(corpus.HERE)
            target = out / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(corpus.as_used(json.loads(path.read_text()))))
        print(f"wrote {len(paths)} configs to {out}")
        return 0
    counts: Counter[str] = Counter()
    for path in paths:
        rel = str(path.relative_to(corpus.HERE))
        if args.parse_dir:
            config = json.loads((Path(args.parse_dir) / rel).read_text())
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from ds_core.errors import ConfigError

                try:
                    from ds_core.config import parse_config

                    parse_config(config, data_parallel_size=corpus.data_parallel_size(config))
                    kind, message = "accept", ""
                except ConfigError as exc:
                    kind, message = "error", str(exc)
        else:
            kind, message, _ = corpus.outcome(corpus.as_used(json.loads(path.read_text())))
        verdict = _judge(kind, message, expected.get(rel))
        counts[verdict] += 1
        if args.verbose:
            print(f"{verdict:22} {rel}" + (f"\n{'':22} {message[:200]}" if message else ""))
    total = len(paths)
    print(f"{total} real configs: " + ", ".join(f"{n} {v}" for v, n in counts.most_common()))
    print(f"accepted: {counts['accepted']}/{total} ({100 * counts['accepted'] / total:.0f}%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
