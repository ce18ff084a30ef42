"""The layers of shared/DESIGN.md, read from the source's imports (ast, not text search).

service -> Trainer -> engines beside the policy model -> core. Nothing points up: an engine sees the
small core only (types, errors, configuration, PEFT files), never the Trainer, its model or the service;
the core and the policy model never import an engine; the Trainer never imports the service; the demo's
recipes are imported by nothing in the library.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# what every engine may import from colo/
SMALL_CORE = {"colo.types", "colo.errors", "colo.config", "colo.peft_files", "colo.durable"}
# the Trainer's side, and what stands on it: every other module of colo/ is core and imports no engine
ABOVE_ENGINES = {"colo", "colo.trainer", "colo.sleep", "colo.doctor", "colo.gpu_check", "colo.cli"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def library_modules() -> dict[str, Path]:
    return {module_name(p): p for package in ("colo", "engines") for p in sorted((ROOT / package).rglob("*.py"))}


MODULES = library_modules()


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in the file (function-level imports too). ``from pkg import
    name`` counts as ``pkg.name`` where that is a module of this project, else as ``pkg``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in MODULES else node.module)
    return {name for name in found if name.split(".")[0] in ("colo", "engines")}


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def violations(rule) -> list[str]:
    return [f"{mod} imports {target}" for mod, path in MODULES.items() for target in sorted(imports(path))
            if rule(mod, target)]


def test_the_walk_sees_the_imports_it_must_judge():
    # the rules below are only as good as this parse: it must find imports at any depth and of each form
    assert "engines.registry" in imports(MODULES["colo.trainer"])
    assert "colo.peft_files" in imports(MODULES["engines.http_engine"])
    assert "colo.trainer" in imports(MODULES["colo"])  # the lazy import inside colo.__getattr__
    assert {"colo.trainer", "colo.model", "engines.pytorch.engine"} <= set(MODULES)


def test_engines_import_only_the_small_core():
    bad = violations(lambda mod, target: within(mod, "engines") and within(target, "colo")
                     and target not in SMALL_CORE)
    assert not bad, bad


def test_the_core_and_the_policy_model_import_no_engine():
    bad = violations(lambda mod, target: within(mod, "colo") and mod not in ABOVE_ENGINES
                     and not within(mod, "colo.service") and not within(mod, "colo.recipes")
                     and within(target, "engines"))
    assert not bad, bad


def test_the_small_core_stands_alone():
    bad = violations(lambda mod, target: mod in SMALL_CORE and target not in SMALL_CORE)
    assert not bad, bad


def test_nothing_below_the_service_imports_it_and_no_library_module_imports_the_recipes():
    bad = violations(lambda mod, target: not within(mod, "colo.service") and within(target, "colo.service"))
    bad += violations(lambda mod, target: not within(mod, "colo.recipes") and within(target, "colo.recipes"))
    assert not bad, bad


@pytest.mark.parametrize("module", ["engines.base", "engines.vllm_engine", "engines.registry", "engines.pytorch.engine",
                                    "engines.http_engine"])
def test_an_engine_module_loads_no_trainer_as_a_programs_first_import(module, tmp_path):
    code = (f"import sys, json; import {module}; "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('colo', 'engines'))))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = set(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert module in loaded  # from another directory, through the installed package
    assert not loaded & {"colo.trainer", "colo.model", "colo.service", "colo.sleep"}, loaded
    assert {m for m in loaded if within(m, "colo")} <= SMALL_CORE | {"colo"}, loaded
