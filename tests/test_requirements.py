"""conda_requirements.txt stays a conda package list that matches requirements.txt."""

import re

from conftest import ROOT

CONDA_NAMES = {"torch": "pytorch", "soundfile": "pysoundfile"}  # pip name -> conda-forge name
SPEC = re.compile(r"^([A-Za-z0-9_.-]+)(?:(=|>=)([0-9][0-9.]*))?$")


def specs(path) -> dict[str, str]:
    """name -> version bound of each package line (comments and blank lines skipped)."""
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            match = SPEC.match(line)
            assert match, f"{path.name}: {line!r} is not a package spec conda reads"
            found[match[1]] = (match[2] or "") + (match[3] or "")
    return found


def test_conda_list_has_every_requirement_with_its_bound():
    conda = specs(ROOT / "conda_requirements.txt")
    pip = specs(ROOT / "requirements.txt")
    assert {CONDA_NAMES.get(name, name): bound for name, bound in pip.items()}.items() <= conda.items()
    assert conda["python"] == "=3.11"
