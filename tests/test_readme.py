"""The README stays true: every config key is documented with its real default, and every
preset it lists exists."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

from charlm.config import SECTIONS, preset_names

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def _yaml_repr(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def test_every_config_key_is_documented_with_its_default():
    rows = dict(re.findall(r"^\| `([a-z_]+\.[a-z_]+)` \| `([^`]*)` \|", README, re.M))
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            key = f"{section}.{f.name}"
            default = f.default if f.default is not f.default_factory else None
            assert key in rows, f"{key} missing from the README's config table"
            assert rows[key] == _yaml_repr(default), f"{key}: README says {rows[key]}"


def test_listed_presets_exist():
    listed = re.findall(r"^\| `([a-z-]+)` \| ", README, re.M)
    presets = [name for name in listed if "." not in name and not name.startswith("--")]
    assert presets and set(presets) <= set(preset_names())
