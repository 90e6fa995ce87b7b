"""The package's imports point one way: down the pipeline, in the order of LAYERS (docs/ARCHITECTURE.md).

Every module under src/dpokit is parsed with `ast`; imports inside functions count as much as those at the top
(only `if TYPE_CHECKING:` blocks, which never run, are left out). A module may import its own layer or one
below it, never one above; and no two modules may import each other, directly or round a longer loop. Run:
    pytest tests/test_imports.py
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "dpokit"
MAX_LINES = 400

# Bottom to top. A module belongs to the layer of its longest prefix listed here.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("dpokit.options", "dpokit.cache")),          # what each TrainConfig field is; the cache folder
    ("objectives", ("dpokit.objectives",)),                # the table (read by config) and tensor functions
    ("config", ("dpokit.config", "dpokit.config_checks")),
    ("data", ("dpokit.data",)),
    ("batches", ("dpokit.batches",
                 "dpokit.data.check")),                    # `data check` counts tokens as training would
    ("distributed", ("dpokit.distributed",)),              # process groups; wraps the module it is given
    ("logprobs", ("dpokit.logprobs",)),                    # pairs_logps runs in lockstep under FSDP2
    ("models", ("dpokit.models",)),                        # loading installs logprobs' attention and head
    ("generation", ("dpokit.generation",)),
    ("evaluation", ("dpokit.evaluation",)),
    ("estimate", ("dpokit.estimate",)),
    ("loop", ("dpokit.loop",)),
    ("report", ("dpokit.report",)),
    ("bench", ("dpokit.bench_tools", "dpokit.bench_long", "dpokit.bench")),
    ("tasks", ("dpokit.tasks",)),
    ("cli", ("dpokit.cli", "dpokit.__main__", "dpokit")),  # the command line and the package's public names
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def layer_of(module: str) -> int:
    best = max(((len(prefix), i) for i, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
                if module == prefix or module.startswith(prefix + ".")), default=None)
    assert best is not None, f"{module} is in no layer: add it to LAYERS (and docs/ARCHITECTURE.md)"
    return best[1]


def _runs(tree: ast.AST):
    """Every node that can run: `if TYPE_CHECKING:` bodies left out."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            yield from (n for child in node.orelse for n in [child, *_runs(child)])
            continue
        yield node
        yield from _runs(node)


def imports_of(module: str) -> dict[str, int]:
    """{imported dpokit module: line} of one module, at any depth."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: dict[str, int] = {}
    for node in _runs(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            # `from dpokit.x import y` imports the module dpokit.x.y when there is one, else a name of dpokit.x
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] == "dpokit" and target != module:
                found.setdefault(target, node.lineno)
    return found


GRAPH = {m: imports_of(m) for m in MODULES}


def test_every_import_points_down_the_pipeline():
    up = [f"{m}:{line} imports {t} ({LAYERS[layer_of(m)][0]} → {LAYERS[layer_of(t)][0]})"
          for m, targets in GRAPH.items() for t, line in targets.items() if layer_of(t) > layer_of(m)]
    assert not up, "imports pointing up the pipeline:\n" + "\n".join(up)


def test_no_import_cycle():
    """Tarjan's strongly connected components over the module graph: any component of 2+ modules is a cycle."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for m in GRAPH:
        if m not in index:
            visit(m)
    assert not cycles, "modules importing each other: " + "; ".join(" ↔ ".join(c) for c in cycles)


def test_the_check_finds_what_it_looks_for():
    """The checker itself: imports inside functions count, TYPE_CHECKING blocks do not, every module has a layer."""
    assert "dpokit.loop.result" in GRAPH["dpokit.cli"]  # inside a function (cmd_estimate): counted
    assert "dpokit.data.formats" in GRAPH["dpokit.data"]  # the package's __init__
    assert "dpokit.logprobs.sequence" not in GRAPH["dpokit.objectives.registry"]  # TYPE_CHECKING only
    assert "dpokit.objectives.paired" in GRAPH["dpokit.objectives.registry"]  # lazily, inside a function
    assert layer_of("dpokit.data.check") == layer_of("dpokit.batches.tokenize") > layer_of("dpokit.data.formats")
    with pytest.raises(AssertionError, match="in no layer"):
        layer_of("elsewhere.module")


def test_no_source_file_is_long():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines (split them by what they do): {long}"


LIGHT = """
import sys
import dpokit.cli
try:
    dpokit.cli.main({argv!r})
except SystemExit:
    pass
heavy = [m for m in ("torch", "transformers") if m in sys.modules]
print("HEAVY", heavy)
"""


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["losses"], ["train", "--beta", "x"],
                                  ["eval", "--help"], ["demo", "--help"]])
def test_help_losses_and_argument_errors_do_not_import_torch(argv):
    """`dpokit --help`, a command's help, `dpokit losses` and a bad flag answer without torch or transformers
    (issue 16 part 6: importing them took seconds)."""
    out = subprocess.run([sys.executable, "-c", LIGHT.format(argv=argv)], capture_output=True, text=True,
                         timeout=120)
    assert "HEAVY []" in out.stdout, (out.stdout[-2000:], out.stderr[-2000:])


def test_a_refused_option_does_not_import_torch():
    out = subprocess.run([sys.executable, "-c", LIGHT.format(argv=["train", "--data", "x.jsonl", "--loss", "nope"])],
                         capture_output=True, text=True, timeout=120)
    assert "unknown objective" in out.stderr and "torch'" not in out.stdout
    assert "'torch'" not in out.stdout.split("HEAVY")[-1], out.stdout
