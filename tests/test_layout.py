"""The shape issue #17 asked for stays true: short functions in pipeline/, a short training loop."""
from __future__ import annotations

import ast
from pathlib import Path

PIPELINE = Path(__file__).resolve().parent.parent / "pipeline"
MAX_FUNCTION_LINES = 40
MAX_LOOP_LINES = 300


def _long_functions() -> dict[tuple[str, str], int]:
    found = {}
    for path in sorted(PIPELINE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    found[(path.relative_to(PIPELINE).as_posix(), node.name)] = lines
    return found


def test_no_function_in_pipeline_is_over_40_lines():
    long = _long_functions()
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (split them): {long}"


def test_the_training_loop_file_stays_short():
    lines = len((PIPELINE / "train" / "loop.py").read_text().splitlines())
    assert lines <= MAX_LOOP_LINES, f"pipeline/train/loop.py has {lines} lines; move set-up to assembly.py"


def test_the_loop_never_branches_on_the_data_set_or_model_kind():
    """Figures and physics come as hooks (pipeline.train.image_hooks), chosen once in pipeline.train.assembly.build."""
    source = (PIPELINE / "train" / "loop.py").read_text()
    for word in ("data.source", "model.name", "OBSERVABLES", "physics", "isinstance"):
        assert word not in source, word
