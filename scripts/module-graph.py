#!/usr/bin/env python3
"""The dependency picture of src/: which top-level module names which, read from the code itself.

Every `crate::a::...` path in a file of module `x` (a `use` line or a path in an expression) is an edge
x -> a between top-level modules of the library. Prints the edges as a Mermaid graph and exits 1 if the
graph has a circle (a strongly connected component with more than one module), naming its members.

    scripts/module-graph.py            # Mermaid on stdout, circles on stderr
    scripts/module-graph.py --check    # only the circle check (scripts/test.sh runs this)
"""
import re
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
PATH = re.compile(r"\bcrate::([a-z_][a-z0-9_]*)")
# `use crate::{a, b::c}` names several modules at once.
GROUP = re.compile(r"\buse\s+crate::\{([^;]*)\};", re.S)
COMMENT = re.compile(r"//[^\n]*")
TEST_MOD = re.compile(r"#\[cfg\(test\)\]\s*mod\s+\w+\s*\{")
TEST_DECL = re.compile(r"#\[cfg\(test\)\]\s*(?:pub(?:\([a-z]+\))?\s+)?mod\s+(\w+)\s*;")


def module_of(path: Path) -> str | None:
    rel = path.relative_to(SRC)
    if rel.parts[0] in ("lib.rs", "main.rs"):
        return None  # the crate root and the binary name every module; they are not in a circle
    return rel.parts[0].removesuffix(".rs")


def edges() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    # Files declared `#[cfg(test)] mod name;` are test code as a whole.
    test_only: set[Path] = set()
    for f in SRC.rglob("*.rs"):
        here = f.parent if f.name in ("mod.rs", "lib.rs", "main.rs") else f.with_suffix("")
        for name in TEST_DECL.findall(f.read_text()):
            test_only.update({here / f"{name}.rs", here / name / "mod.rs"})
    for f in sorted(SRC.rglob("*.rs")):
        m = module_of(f)
        if m is None:
            continue
        if f in test_only:
            continue
        text = COMMENT.sub("", f.read_text())
        # Tests may reach anywhere; the picture is of the code that ships. A test module is the end of its
        # file (the house style), so everything from its opening on is cut.
        text = TEST_MOD.split(text)[0]
        targets = set(PATH.findall(text))
        for group in GROUP.findall(text):
            for item in group.split(","):
                head = item.strip().split("::")[0].strip()
                if re.fullmatch(r"[a-z_][a-z0-9_]*", head):
                    targets.add(head)
        graph.setdefault(m, set()).update(t for t in targets if t != m)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one member."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def main() -> int:
    graph = edges()
    found = circles(graph)
    if "--check" not in sys.argv:
        print("graph LR")
        for a in sorted(graph):
            for b in sorted(graph[a]):
                print(f"    {a} --> {b}")
    for c in found:
        print(f"module circle: {' <-> '.join(c)}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
