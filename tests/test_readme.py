"""README.md and docs/config.md stay honest: the config-key table is the one the code describes, and the README's
commands exist."""

import re
from pathlib import Path

from online_aug.config import describe

ROOT = Path(__file__).resolve().parents[1]


def test_config_reference_matches_code():
    text = (ROOT / "docs" / "config.md").read_text()
    m = re.search(r"<!-- config-keys:start -->\n(.*?)\n<!-- config-keys:end -->", text, re.S)
    assert m, "docs/config.md lost its config-keys markers"
    assert m.group(1).strip() == describe().strip(), \
        "regenerate the table in docs/config.md: python -m online_aug.config"


def test_readme_commands_exist():
    text = (ROOT / "README.md").read_text()
    make = (ROOT / "Makefile").read_text()
    for target in ("demo", "test"):
        assert f"make {target}" in text
        assert re.search(rf"^{target}:", make, re.M)
    assert "make test" in (ROOT / ".ci/run").read_text()
    for cfg in re.findall(r"configs/[\w/.-]+\.yaml", text):
        assert (ROOT / cfg).is_file(), f"README names {cfg}, which does not exist"
