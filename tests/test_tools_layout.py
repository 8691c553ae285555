"""tools/ holds thin command-line scripts: none imports another tool (shared code lives in the package, e.g.
online_aug/experiments/), and none reaches modules by editing sys.path (a tool then works only when run from
tools/)."""

from __future__ import annotations

import ast
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def _imported_modules(tree: ast.AST) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            out.add("." if node.level else (node.module or "").split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) in ("import_module", "__import__") \
                and node.args and isinstance(node.args[0], ast.Constant):
            out.add(str(node.args[0].value).split(".")[0])
    return out


def _touches_sys_path(tree: ast.AST) -> bool:
    """Any use of ``sys.path`` (insert, append, assignment, ...): a tool has no reason to read or change it."""
    return any(isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
               and node.value.id == "sys" for node in ast.walk(tree))


def test_no_tool_imports_another_tool_or_edits_sys_path() -> None:
    tools = {p.stem: p for p in TOOLS.glob("*.py")}
    assert {"compare", "bench", "gpu_check"} <= set(tools)
    bad = {}
    for name, path in tools.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        siblings = sorted(_imported_modules(tree) & (set(tools) - {name}) | ({"."} & _imported_modules(tree)))
        if siblings:
            bad[name] = f"imports {', '.join(siblings)}"
        if _touches_sys_path(tree):
            bad[name] = bad.get(name, "") + " uses sys.path"
    assert not bad, bad


def test_the_checks_catch_both() -> None:
    tree = ast.parse("import sys\nsys.path.append('tools')\nfrom bench import bench_training\n")
    assert _touches_sys_path(tree) and "bench" in _imported_modules(tree)
    assert not _touches_sys_path(ast.parse("import sys\nsys.exit(main())\n"))
