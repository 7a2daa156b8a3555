"""The package's structure: no import circle, and callbacks that use only the trainer's view."""

import ast
import pathlib
import re

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "nnxloop"


def module_name(path):
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph():
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {m: set() for m in modules}
    for name, path in modules.items():
        # every import statement, those under `if TYPE_CHECKING:` included
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nnxloop"):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    graph[name].add(sub if sub in modules else node.module)
            elif isinstance(node, ast.Import):
                graph[name] |= {a.name for a in node.names if a.name.startswith("nnxloop")}
    return graph


def test_no_import_circle():
    graph = import_graph()
    state = {}

    def visit(node, trail):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                raise AssertionError(" -> ".join([*trail, node, nxt]))
            if nxt in graph and nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_callbacks_reach_the_trainer_only_through_its_view():
    forbidden = re.compile(r"trainer\.(engine|save_coordinator|_\w+)")
    for path in (PACKAGE / "callbacks").glob("*.py"):
        hits = forbidden.findall(path.read_text())
        assert not hits, f"{path.name} uses trainer.{hits[0]}"
