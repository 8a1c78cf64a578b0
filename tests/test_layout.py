"""The tree follows the flow (docs/architecture.md): the node side and the admin side meet only
in the spool contract. (Module names written in strings: tests/test_module_names.py.)"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "llem"

NODE_SIDE = ("node", "sensors", "sampler.py")
ADMIN_SIDE = ("llem.cluster", "llem.acct", "llem.report")
# Hook glue, documented in docs/architecture.md.
ALLOWED = {("node/hooks.py", "llem.cluster.header"), ("cluster/header.py", "llem.node.outbox")}


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def _files(*parts: str) -> list[Path]:
    out = []
    for part in parts:
        p = SRC / part
        out.extend(sorted(p.rglob("*.py")) if p.is_dir() else [p])
    return out


def _crossings(files: list[Path], forbidden: tuple[str, ...], root: Path = SRC) -> list[str]:
    bad = []
    for path in files:
        rel = path.relative_to(root).as_posix()
        for name in sorted(_imports(path)):
            hit = next((f for f in forbidden if name == f or name.startswith(f + ".")), None)
            if hit and not any(rel == a and name.startswith(m) for a, m in ALLOWED):
                bad.append(f"{rel} imports {name}")
    return bad


def test_node_side_imports_no_admin_side():
    assert _crossings(_files(*NODE_SIDE), ADMIN_SIDE) == []


def test_cluster_side_imports_no_node_side():
    assert _crossings(_files("cluster"), ("llem.node",)) == []


def test_the_checker_sees_a_crossing(tmp_path):
    bad = tmp_path / "node" / "bad.py"
    bad.parent.mkdir()
    bad.write_text("def f():\n    from llem.cluster.ledger import Ledger\n")
    assert _crossings([bad], ADMIN_SIDE, root=tmp_path) == [
        "node/bad.py imports llem.cluster.ledger",
        "node/bad.py imports llem.cluster.ledger.Ledger",
    ]


def test_no_test_module_imports_another_or_bench():
    """Shared builders live in tests/helpers and fixtures in tests/conftest.py."""
    tests = Path(__file__).resolve().parent
    bad = []
    for path in sorted(tests.rglob("test_*.py")):
        for name in sorted(_imports(path)):
            leaf = name.split(".")
            if any(part.startswith("test_") for part in leaf[:2]) or leaf[0] == "bench":
                bad.append(f"{path.relative_to(tests).as_posix()} imports {name}")
    assert bad == []
