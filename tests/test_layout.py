"""The arrows of the design: tasks → piece_mm → eval, experiments on top. Read from the source (every import
statement, at module level or inside a function), not from what happens to be loaded."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"piece_mm": "piece_mm", "tasks": "piece_mm.tasks", "eval": "piece_mm.eval",
            "experiments": "piece_mm.experiments"}
# what model loading and training are: eval must reach none of them
TRAINING = ("piece_mm.models", "piece_mm.train", "piece_mm.continual", "piece_mm.zoo", "piece_mm.delta",
            "piece_mm.sparse", "piece_mm.select", "piece_mm.methods", "piece_mm.importance", "piece_mm.trainer",
            "piece_mm.runconfig", "piece_mm.checkpoint", "piece_mm.shard", "piece_mm.dist")


def _modules() -> dict:
    """{dotted module name: source file} for every module of the installed layout."""
    out = {}
    for folder, package in PACKAGES.items():
        for f in sorted((ROOT / folder).rglob("*.py")):
            if folder == "piece_mm" and f.relative_to(ROOT / folder).parts[0] in ("checkpoints",):
                continue
            rel = f.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = f
    return out


def _imports(name: str, path: Path) -> set:
    """The project modules `path` imports (relative imports resolved)."""
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = here[:len(here) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            found.add(mod)
            found |= {f"{mod}.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] in ("piece_mm", "tasks", "eval", "experiments")}


def _graph() -> dict:
    mods = _modules()
    return {m: {i for i in _imports(m, f) if i in mods} for m, f in mods.items()}


def test_tasks_import_nothing_of_piece_mm_or_eval():
    for m, deps in _graph().items():
        if m.startswith("piece_mm.tasks"):
            assert all(d.startswith("piece_mm.tasks") for d in deps), (m, deps)
    for f in (ROOT / "tasks").rglob("*.py"):  # nor by the top-level names
        assert not {i for i in _imports("tasks.x", f) if i.split(".")[0] in ("eval", "experiments", "piece_mm")
                    and not i.startswith("piece_mm.tasks")}, f


def test_eval_loads_no_model_and_imports_no_training_code():
    for m, deps in _graph().items():
        if m.startswith("piece_mm.eval"):
            bad = {d for d in deps if d.startswith(TRAINING) or d.startswith("piece_mm.experiments")}
            assert not bad, (m, bad)


def test_piece_mm_imports_no_experiments_and_eval_only_in_the_loop_and_the_cli():
    for m, deps in _graph().items():
        if m.startswith("piece_mm.") and not m.startswith(("piece_mm.tasks", "piece_mm.eval", "piece_mm.experiments")):
            assert not any(d.startswith("piece_mm.experiments") for d in deps), m
            if any(d.startswith("piece_mm.eval") for d in deps):
                assert m in ("piece_mm.continual", "piece_mm.train", "piece_mm.cli"), m


def test_errors_live_in_one_module():
    for f in list((ROOT / "piece_mm").rglob("*.py")) + [*(ROOT / "eval").rglob("*.py"),
                                                         *(ROOT / "experiments").rglob("*.py")]:
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.name.endswith("Error"):
                assert f == ROOT / "piece_mm" / "errors.py", (f, node.name)


def test_no_import_cycle_between_modules():
    g = _graph()
    state = {}

    def visit(m, path):
        state[m] = "open"
        for d in sorted(g[m]):
            if d == m or d.startswith(m + "."):  # a package importing its own submodules
                continue
            if state.get(d) == "open" and not m.startswith(d + "."):
                raise AssertionError(" -> ".join(path + [d]))
            if d not in state:
                visit(d, path + [d])
        state[m] = "done"
    for m in sorted(g):
        if m not in state:
            visit(m, [m])
