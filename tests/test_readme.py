"""README.md is a contract: its options table matches the plugin's options, and its test examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

from pytest_llmload._internal.config.options import OPTIONS

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_options_table_lists_every_option_and_ini_key():
    rows = re.findall(r"^\| `(--llm-[a-z0-9-]+)[^`]*`[^|]*\| `([a-z_]+)` \|", README.read_text(), flags=re.M)
    assert sorted(rows) == sorted((option, ini) for option, ini, *_ in OPTIONS)


def test_every_readme_test_example_runs_as_written(pytester):
    """Each python block that defines a test runs in a fresh pytest process (hypothesis' default
    profile, no conftest of ours), so a deadline or a missing import in the README shows here."""
    blocks = [b for b in python_blocks() if re.search(r"^def test_", b, flags=re.M)]
    assert len(blocks) >= 4
    for number, block in enumerate(blocks):
        pytester.path.joinpath(f"test_readme_{number}.py").write_text(block)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rs")
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) == 0 and outcomes.get("errors", 0) == 0, result.stdout.str()
    assert outcomes.get("passed", 0) >= len(blocks) - 1  # the 2-GPU example skips here


def test_the_layout_section_names_every_package_and_module_of_the_tree():
    """README's "How the code is laid out" and the tree agree (issue 23)."""
    import pathlib
    import re

    import pytest_llmload

    root = pathlib.Path(pytest_llmload.__file__).parent
    section = README.read_text(encoding="utf-8").split("## How the code is laid out", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`([\w/]+(?:\.py)?/?)`", section))
    missing = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if path.name == "__init__.py" and relative.parent != pathlib.Path("."):
            package = relative.parts[-2] + "/"
            if package not in named:
                missing.append(str(relative.parent) + "/")
        elif path.name != "__init__.py" and path.name not in named:
            missing.append(str(relative))
    assert not missing, f"README's layout section does not name: {missing}"
    for name in named:
        if name.endswith("/"):
            assert list(root.rglob(name.rstrip("/"))), f"README names {name}, which is not in the tree"


def _command_samples() -> list[tuple[str, str]]:
    """``$ llmload ...`` lines of README's text blocks that are followed by output, with that output."""
    blocks: list[list[str]] = []
    current: list[str] | None = None
    kind = ""
    for line in README.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            if current is None:  # an opening fence; its language (python, toml, ...) is kept in kind
                current, kind = [], line[3:]
            else:
                if not kind:  # plain blocks hold the command samples
                    blocks.append(current)
                current = None
        elif current is not None:
            current.append(line)
    samples = []
    for lines in blocks:
        for index, line in enumerate(lines):
            if line.startswith("$ llmload "):
                output = []
                for following in lines[index + 1:]:
                    if following.startswith("$ "):
                        break
                    output.append(following)
                if output:
                    samples.append((line[2:], "\n".join(output)))
    return samples


def test_readme_command_samples_are_what_the_commands_print():
    """Each sample is the command's real output (the plan sample lacked a note the command prints)."""
    import shlex
    import subprocess
    import sys

    samples = _command_samples()
    assert len(samples) >= 3
    for command, expected in samples:
        args = shlex.split(command)[1:]
        result = subprocess.run([sys.executable, "-m", "pytest_llmload", *args], capture_output=True, text=True,
                                timeout=300)
        printed = (result.stdout + result.stderr).rstrip("\n")
        assert printed == expected, f"README's sample of `{command}` differs from its output:\n{printed}"


def test_readme_installs_only_what_exists():
    """`pip install pytest-llmload` (no release exists) was README's install line and its CI example's."""
    text = README.read_text(encoding="utf-8")
    for line in text.splitlines():
        if "pip install" in line and "`pip install" not in line:  # commands, not prose quoting one
            words = line.replace('"', " ").split("#")[0].split()
            for index, word in enumerate(words):  # the bare name would ask PyPI; "name @ URL" is a direct reference
                assert word != "pytest-llmload" or words[index + 1:index + 2] == ["@"], line
    assert "has no release on PyPI yet" in text
