"""The package's folders are its layers: a module imports only its own layer and the ones below.

The order, bottom to top: core (no phase) → data (phase 0, the token store, KorMedMCQA's task) →
modeling (model families, rows, loss) → vocab (phases 1-2) → training (phases 3-4) → evaluation
(phase 5, the experiments) → deploy (phase 6) → pipeline (the steps, the runner, the report) → the
command line. Read from every import statement, function-level ones included.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "kormedgemma"
LAYERS = ("core", "data", "modeling", "vocab", "training", "evaluation", "deploy", "pipeline")
TOP = {"kormedgemma", "kormedgemma.__main__", "kormedgemma.cli"}


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    if module in TOP:
        return len(LAYERS)
    return LAYERS.index(module.split(".")[1])


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("kormedgemma"):
            found.add(node.module)
            if node.module in ("kormedgemma", *(f"kormedgemma.{layer}" for layer in LAYERS)):
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("kormedgemma"))
    return found


def _modules() -> dict[str, Path]:
    return {_module(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_lives_in_a_layer():
    loose = [name for name in _modules() if name not in TOP and (name.count(".") < 1 or name.split(".")[1] not in LAYERS)]
    assert not loose, f"modules outside the layers {LAYERS}: {loose}"
    assert all((PACKAGE / layer / "__init__.py").is_file() for layer in LAYERS)


def test_imports_are_absolute_so_the_layer_check_reads_them_all():
    relative = [f"{name}:{node.lineno}" for name, path in _modules().items()
                for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                if isinstance(node, ast.ImportFrom) and node.level > 0]
    assert not relative, f"relative imports (write them as kormedgemma.<layer>.<module>): {relative}"


def test_no_module_imports_from_a_layer_above_its_own():
    modules = _modules()
    upward = []
    for name, path in modules.items():
        for imported in _imports(path):
            target = imported if imported in modules else imported.rsplit(".", 1)[0]
            assert target in modules, f"{name} imports {imported}, which does not exist"
            if _layer(target) > _layer(name):
                upward.append(f"{name} ({LAYERS[_layer(name)] if name not in TOP else 'top'}) imports {target}")
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_the_checker_sees_an_upward_import(tmp_path):
    # the rule has teeth: a planted `core` module importing from `training` is caught
    planted = tmp_path / "planted.py"
    planted.write_text("def f():\n    from kormedgemma.training.stage import train_stage\n", encoding="utf-8")
    imported = _imports(planted)
    assert imported == {"kormedgemma.training.stage"}
    assert _layer("kormedgemma.training.stage") > _layer("kormedgemma.core.io")


def test_the_report_asks_the_module_that_makes_each_artifact_for_its_line():
    import importlib

    from kormedgemma.core.artifacts import ARTIFACTS
    from kormedgemma.pipeline.report import HEADLINES, headline

    assert set(HEADLINES) == set(ARTIFACTS)
    for key, target in HEADLINES.items():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(f"kormedgemma.{module}"), function)), key
    assert headline("korean_sp", {"pieces": 1234}) == "1,234 Korean pieces"
    assert headline("stage3", {"steps": 2, "tokens": 1024, "tokens_per_second": 99.6, "first_loss": 3.5,
                               "last_loss": 3.1, "final_eval": {"korean_valid_loss": 3.2, "english_valid_loss": 2.9}}) == (
        "2 steps, 1,024 tokens at 100 tok/s; train loss 3.5 → 3.1; valid ko 3.2 / en 2.9")
    assert headline("not_an_artifact", {"a": 1}) == '{"a": 1}'
