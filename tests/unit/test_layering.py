"""Imports run one way: parallel/ (primitives) <- model/, ckpt/ <- engine/ <- trainers (DESIGN.md)."""
import ast
import pathlib

import megatron_r1

PKG = pathlib.Path(megatron_r1.__file__).parent
ABOVE_PARALLEL = ("model", "ckpt", "engine", "rl", "sft", "rollout", "training", "eval", "recipes", "dryrun")


def _imports(path: pathlib.Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):  # function-level imports count too
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_parallel_imports_no_layer_above_it():
    bad = []
    for f in sorted((PKG / "parallel").glob("*.py")):
        for mod in _imports(f):
            parts = mod.split(".")
            if parts[0] == "megatron_r1" and len(parts) > 1 and parts[1] in ABOVE_PARALLEL:
                bad.append(f"{f.name} imports {mod}")
    assert not bad, bad


def test_model_and_ckpt_do_not_import_the_engine():
    bad = [f"{f.relative_to(PKG)} imports {m}" for d in ("model", "ckpt") for f in sorted((PKG / d).glob("*.py"))
           for m in _imports(f) if m.startswith("megatron_r1.engine")]
    assert not bad, bad
