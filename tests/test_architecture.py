"""The package's import rules, read from the source (every ``import``, lazy ones inside functions included: a lazy
import still makes two modules depend on each other):

- no import cycle inside online_aug/;
- the frozen-SD package (``online_aug/generator/``) imports neither the data nor any training code (the classifier's
  runtime, the SD-training wing, the test machinery, the experiment harness);
- the SD-training wing (``online_aug/sdtrain/``) never imports the classifier's trainer or its batch-source runtime
  (sources, prefetch, augmenter, policy, closed loop), and that runtime never imports the wing;
- data flows one way through the runtime: loader → policy → generator → augmenter → prefetch → sources → trainer →
  monitor;
- no runtime module (everything in online_aug/ but ``online_aug/testing/``) imports ``online_aug/testing/``; outside
  tests/ only tools/gpu_check.py imports it, and train.py only lazily under ``ONLINE_AUG_INJECT_FAULT``;
- nothing reaches the package through sys.path hacks.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "online_aug"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The longest known module prefix of a dotted name (``online_aug.generator.sdedit.X`` → the sdedit module)."""
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        cand = ".".join(parts[:k])
        if cand in known:
            return cand
    return None


def import_graph() -> dict[str, set[str]]:
    known = _modules()
    graph: dict[str, set[str]] = {m: set() for m in known}
    for mod, path in known.items():
        is_pkg = path.name == "__init__.py"
        base = mod.split(".") if is_pkg else mod.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    anchor = base[: len(base) - node.level + 1]
                    prefix = ".".join(anchor + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                targets = [f"{prefix}.{a.name}" for a in node.names] + [prefix]
            for t in targets:
                r = _resolve(t, known)
                if r is not None and r != mod:
                    graph[mod].add(r)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            # a package __init__ importing its own submodules is how packages export names, not a cycle
            if m.startswith(n + ".") and (PKG.parent / n.replace(".", "/") / "__init__.py").exists():
                continue
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (c := visit(n)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_the_checker_finds_a_cycle_and_an_edge() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    g = import_graph()
    assert "online_aug.generator" in g["online_aug.augment"]  # a lazy import inside a function is seen
    assert "online_aug.config" in g["online_aug.trainer"]


def test_no_import_cycle_inside_the_package() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# The classifier's training runtime: the trainer and everything that makes its batches.
RUNTIME = ("online_aug.trainer", "online_aug.sources", "online_aug.prefetch", "online_aug.augment",
           "online_aug.policy", "online_aug.closed_loop", "online_aug.class_stats", "online_aug.batches",
           "online_aug.checkpoint", "online_aug.monitor", "online_aug.unlabelled", "online_aug.pseudo_labels")
SDTRAIN, TESTING = "online_aug.sdtrain", "online_aug.testing"


def _within(name: str, prefixes: str | tuple[str, ...]) -> bool:
    prefixes = (prefixes,) if isinstance(prefixes, str) else prefixes
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _violations(importers: str | tuple[str, ...], forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    g = import_graph()
    bad = {m: sorted(d for d in deps if _within(d, forbidden)) for m, deps in g.items() if _within(m, importers)}
    return {m: d for m, d in bad.items() if d}


def test_generator_package_does_not_depend_on_data_or_training() -> None:
    forbidden = ("online_aug.data", *RUNTIME, SDTRAIN, TESTING, "online_aug.experiments")
    assert not (bad := _violations("online_aug.generator", forbidden)), bad


def test_sd_training_wing_never_imports_the_classifier_runtime() -> None:
    assert not (bad := _violations(SDTRAIN, (*RUNTIME, TESTING))), bad


def test_classifier_runtime_never_imports_the_sd_training_wing() -> None:
    assert not (bad := _violations(RUNTIME, (SDTRAIN,))), bad


def test_data_flows_one_way() -> None:
    """loader → policy → generator → prefetch → trainer → monitor: no stage imports a later one."""
    g = import_graph()
    order = ["online_aug.batches", "online_aug.policy", "online_aug.generator", "online_aug.augment",
             "online_aug.prefetch", "online_aug.sources", "online_aug.trainer", "online_aug.monitor"]
    for i, early in enumerate(order):
        for late in order[i + 1:]:
            if late == "online_aug.monitor" and early == "online_aug.trainer":
                continue  # the trainer drives the monitor: that is the forward edge
            deps = {d for m, ds in g.items() if m == early or m.startswith(early + ".") for d in ds}
            assert not any(d == late or d.startswith(late + ".") for d in deps), f"{early} imports {late}"


def test_no_sys_path_hacks() -> None:
    offenders = [str(p.relative_to(ROOT)) for d in ("tools", "tests", "online_aug") for p in (ROOT / d).rglob("*.py")
                 if "sys.path.insert" in p.read_text() and p.name != "test_architecture.py"]
    assert not offenders, offenders


def test_runtime_modules_never_import_the_testing_package() -> None:
    runtime = tuple(m for m in _modules() if not _within(m, TESTING))
    assert not (bad := _violations(runtime, (TESTING,))), bad


def _testing_imports(path: Path) -> list[tuple[ast.AST, list[ast.AST]]]:
    """Each import of online_aug.testing in ``path``, with the nodes around it (outermost first)."""
    found: list[tuple[ast.AST, list[ast.AST]]] = []

    def visit(node: ast.AST, outer: list[ast.AST]) -> None:
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        if any(_within(n, TESTING) for n in names):
            found.append((node, outer))
        for child in ast.iter_child_nodes(node):
            visit(child, [*outer, node])

    visit(ast.parse(path.read_text()), [])
    return found


def test_outside_tests_only_gpu_check_and_train_py_under_the_fault_variable_import_testing() -> None:
    scripts = [*sorted((ROOT / "tools").rglob("*.py")), ROOT / "train.py"]
    users = {str(p.relative_to(ROOT)) for p in scripts if _testing_imports(p)}
    assert users <= {"tools/gpu_check.py", "train.py"}, users
    for node, outer in _testing_imports(ROOT / "train.py"):
        guards = [n for n in outer if isinstance(n, ast.If) and "INJECT_ENV" in ast.unparse(n.test)]
        assert guards and any(isinstance(n, ast.FunctionDef) for n in outer), (
            f"train.py:{node.lineno} imports online_aug.testing outside a function's `if os.environ.get(INJECT_ENV)`")
