"""docs/config.md lists every key of the table that is not simply handled, so the page cannot drift."""

from pathlib import Path

from ds_core.config import key_table

DOC = Path(__file__).resolve().parents[3] / "docs" / "config.md"


def test_every_key_without_effect_refused_owned_or_aliased_is_documented():
    text = DOC.read_text()
    missing = [e.path for e in key_table().entries.values()
               if e.status in ("no_effect", "refused", "package", "alias") and f"`{e.path}`" not in text]
    assert not missing, f"docs/config.md does not list {missing}"
