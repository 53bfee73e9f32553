"""Print a pip constraints file pinning every dependency of pyproject.toml to its declared floor.

The floors live in one place, pyproject.toml; CI's second job installs exactly them, so a floor that
is declared is a floor that was tested. torch is left out: CI installs the local CPU build first.
"""

import re
import sys
import tomllib
from pathlib import Path

SKIP = {"torch"}


def floors(pyproject: Path) -> list[str]:
    data = tomllib.loads(pyproject.read_text())
    project = data["project"]
    requirements = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    pins = []
    for requirement in requirements:
        match = re.match(r"^([A-Za-z0-9_.\-]+)\s*(?:\[[^\]]*\])?\s*(.*)$", requirement)
        name, spec = match.group(1), match.group(2)
        low = re.search(r">=\s*([0-9][0-9A-Za-z.]*)", spec)
        if name.lower() in SKIP:
            continue
        if low is None:
            sys.exit(f"{pyproject}: {requirement!r} declares no floor (>=); every dependency needs one")
        pins.append(f"{name}=={low.group(1)}")
    return pins


if __name__ == "__main__":
    root = Path(__file__).resolve().parent.parent
    print("\n".join(floors(root / "pyproject.toml")))
