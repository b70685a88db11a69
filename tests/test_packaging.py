"""pyproject.toml and environment.yml name the same dependencies; the console script is declared."""

from __future__ import annotations

import re
import tomllib

from _helpers import REPO_ROOT


def _norm(spec: str) -> tuple[str, str]:
    spec = spec.replace(" ", "")
    m = re.match(r"^([A-Za-z0-9_.\-]+)(.*)$", spec)
    assert m, spec
    return m.group(1).lower().replace("_", "-"), m.group(2)


def test_environment_yml_matches_pyproject() -> None:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_norm(d) for d in project["dependencies"] + project["optional-dependencies"]["dev"]}
    conda: set[tuple[str, str]] = set()
    text = (REPO_ROOT / "environment.yml").read_text()
    for line in text.split("dependencies:", 1)[1].splitlines():
        m = re.match(r"^\s*-\s+(\S.*)$", line)
        if not m or m.group(1).endswith(":"):
            continue
        item = m.group(1).split("#")[0].strip()
        if item in ("pip", "-e .") or item.startswith("python="):
            continue
        conda.add(_norm(item))
    assert conda == wanted, f"only in environment.yml: {conda - wanted}; only in pyproject: {wanted - conda}"


def test_console_script_and_torch_pin() -> None:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["kmotion"] == "kmotion.cli:main"
    assert "torch==2.13.0" in project["dependencies"]
