"""pyproject.toml's runtime dependencies and the README's install commands."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from llmchat.registry import repo_for, resolve

REPO = Path(__file__).resolve().parent.parent


def _deps() -> list[str]:
    data = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    return [re.split(r"[<>=!~ ;\[]", d, maxsplit=1)[0].lower()
            for d in data["project"]["dependencies"]]


def test_numpy_is_a_runtime_dependency() -> None:
    """torch prints a NumPy warning before every error without it (CPU wheels do not pull it)."""
    assert "numpy" in _deps() and "torch" in _deps()


def test_readme_quick_start_and_cpu_install() -> None:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    quick = text[text.index("## Quick start"):text.index("## Using it")]
    commands = re.findall(r"```bash\n(.*?)\n```", quick, flags=re.S)
    assert "pip install . && llmchat chat --model chatglm2 --quant 4" in commands
    assert "pip install torch==2.13.0 -e '.[test]' && python -m pytest" in commands
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in commands
    # what the main command downloads is what the loader fetches for it
    repo = repo_for(resolve("chatglm2"), 4)
    assert repo == "THUDM/chatglm2-6b-int4" and f"`{repo}`" in quick
