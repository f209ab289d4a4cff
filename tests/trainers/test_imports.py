"""The package's public surface: importable without Ray or Optuna, light until a trial runs, and
covering every name ``search`` takes from it."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import trainers

REPO = Path(__file__).resolve().parents[2]
_HEAVY = ("torch", "transformers", "sentence_transformers", "faiss", "ray", "optuna")


def _run(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_every_public_name_imports_without_ray_or_optuna():
    # None in sys.modules makes `import ray` fail as if it were not installed.
    code = (
        "import sys\n"
        "sys.modules['ray'] = None; sys.modules['optuna'] = None\n"
        "import trainers\n"
        "missing = [name for name in trainers.__all__ if getattr(trainers, name, None) is None]\n"
        "print(missing)\n"
    )
    assert _run(code).strip() == "[]"


def test_the_package_the_config_the_methods_and_the_forecast_models_load_no_torch():
    code = (
        "import json, sys\n"
        "import trainers, trainers.config, trainers.methods, trainers.cost, trainers.memory\n"
        "import trainers.environment, trainers.errors\n"
        "from trainers import (MiB, ModelShape, TrialMemory, forward_flops, native_bf16,\n"
        "    token_caps, training_flops, trial_memory)\n"
        f"print(json.dumps(sorted(m for m in {_HEAVY!r} if m in sys.modules)))\n"
    )
    assert json.loads(_run(code)) == []


def _names_search_imports_from_trainers() -> dict[str, set[str]]:
    """name -> the search/ files that import it from trainers or one of its modules."""
    names: dict[str, set[str]] = {}
    for path in sorted((REPO / "search").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "trainers":
                for alias in node.names:
                    names.setdefault(alias.name, set()).add(str(path.relative_to(REPO)))
    return names


def test_search_imports_only_public_names_of_trainers():
    used = _names_search_imports_from_trainers()
    assert used  # the parse found search's imports
    outside = {name: sorted(files) for name, files in used.items() if name not in trainers.__all__}
    assert outside == {}, f"search/ imports names missing from trainers.__all__: {outside}"
