"""The package's structure, as docs/concepts/parts.md draws it: no import circle, only
`checkpointing/` imports orbax, the trainer and the fit run load no callback a user composes,
the step and the data feed know nothing above them, callbacks use only the trainer's view,
and nothing of a finished fit stays on the trainer."""

import ast
import pathlib
import re

import optax
from conftest import loss_fn, make_batches, make_model

import nnxloop as nl

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "nnxloop"


def module_name(path):
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(path):
    """Every module an import statement of `path` names (those under `if TYPE_CHECKING:` and
    inside functions included): nnxloop modules by their full name, others by their top."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.startswith("nnxloop"):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    out.add(sub if sub in MODULES else node.module)
            else:
                out.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                name = alias.name
                out.add(name if name.startswith("nnxloop") else name.split(".")[0])
    return out


def import_graph():
    return {name: imports_of(path) for name, path in MODULES.items()}


def closure(start):
    """The nnxloop modules importing `start` loads: what it imports, and the packages those
    live in (their `__init__` runs first), except the package root, the public face, which
    imports everything and which a part never imports."""
    graph, seen, todo = import_graph(), set(), [start]
    while todo:
        module = todo.pop()
        if module in seen or module not in graph:
            continue
        seen.add(module)
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(2, len(parts))]  # parent packages
        todo += [m for m in graph[module] if m.startswith("nnxloop")]
    return seen


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


def test_only_checkpointing_imports_orbax():
    for name, deps in import_graph().items():
        if not name.startswith("nnxloop.checkpointing"):
            assert not deps & {"orbax", "tensorstore", "etils"}, f"{name} imports {deps}"


def test_no_part_imports_the_public_face():
    for name, deps in import_graph().items():
        assert "nnxloop" not in deps, f"{name} imports nnxloop's root"


COMPOSED = {  # the callbacks a user composes (the progress bar is a default the run adds)
    f"nnxloop.callbacks.{m}"
    for m in (
        "async_save",
        "best_model",
        "checkpoint",
        "early_stopping",
        "metrics_logger",
        "monitor",
        "profile",
        "terminate_on_nan",
    )
}


def test_the_trainer_the_run_and_the_protocol_load_no_composed_callback():
    for start in ("nnxloop.trainer", "nnxloop._run.run", "nnxloop._protocol.callback"):
        loaded = closure(start)
        assert not loaded & COMPOSED, f"{start} loads {sorted(loaded & COMPOSED)}"
    assert "nnxloop.callbacks.progress_bar" in closure("nnxloop._run.run")  # the default


def test_the_step_and_the_data_feed_know_nothing_above_them():
    above = ("nnxloop.trainer", "nnxloop._run", "nnxloop.callbacks", "nnxloop._saving")
    for start in [m for m in MODULES if m.startswith(("nnxloop._step", "nnxloop._data"))]:
        loaded = closure(start)
        assert not [m for m in loaded if m.startswith(above)], f"{start} loads {loaded}"


def test_writers_know_nothing_of_the_trainer_or_callbacks():
    above = ("nnxloop.trainer", "nnxloop._run", "nnxloop.callbacks", "nnxloop._protocol")
    for start in [m for m in MODULES if m.startswith("nnxloop.writers")]:
        loaded = closure(start)
        assert not [m for m in loaded if m.startswith(above)], f"{start} loads {loaded}"


def test_callbacks_reach_the_trainer_only_through_its_view():
    forbidden = re.compile(r"trainer\.(engine|saves|settings|progress\b|owner|_\w+)")
    for path in (PACKAGE / "callbacks").glob("*.py"):
        hits = forbidden.findall(path.read_text())
        assert not hits, f"{path.name} uses trainer.{hits[0]}"
        for dep in imports_of(path):
            assert not dep.startswith(("nnxloop._step", "nnxloop._data", "nnxloop._saving")), (
                f"{path.name} imports {dep}"
            )


def test_nothing_of_a_finished_fit_stays_on_the_trainer():
    seen = []

    class Look(nl.Callback):
        def on_step_end(self, trainer, step, logs):
            if step == 3:
                seen.append(trainer.plan)
                trainer.stop_training = True

    trainer = nl.Trainer(make_model(), optax.sgd(0.1), loss_fn=loss_fn, callbacks=[Look()])
    before = dict(vars(trainer))
    history = trainer.fit(make_batches(), max_steps=5)
    after = dict(vars(trainer))
    assert set(after) == set(before)  # no attribute added by the fit
    changed = {k for k in before if after[k] is not before[k]}
    assert changed == {"history"}, changed  # progress counters change in place
    assert seen == [
        nl.FitPlan(epochs=None, max_steps=5, total_steps=5, evaluates=False, eval_every_steps=None)
    ]
    assert trainer.stop_training is False  # a stop asks the running fit only
    assert history.stopped_early and (trainer.step, trainer.epoch) == (3, 0)
