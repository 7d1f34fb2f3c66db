#!/usr/bin/env python3
"""Hand-rolled mutation testing of python/pvfast/pv.py (set-aside, PERFORM, cleanup-all, ...).

Why not mutmut: mutmut 3.8.1 could not be made to attribute test hits to pvfast's maturin layout
(python-source = "python", editable install); see docs/VERIFICATION.md §4. This script is small
and self-contained instead:

* copies python/pvfast (with the built _native extension), tests/ and pyproject.toml to a
  scratch directory, so the shared working tree is never modified;
* parses pv.py with ``ast`` and, inside the selected functions only, makes one mutant per
  site: comparison flips (== !=, < <=, > >=, is/is not, in/not in), and/or swap, ``not``
  removal, ``if c`` -> ``if not c``, += <-> -=, integer constant +1, True <-> False, and
  statement deletion (a statement replaced by ``pass``);
* runs the selected pytest files against each mutant (``-x``, a per-mutant timeout) with
  ``PYTHONPATH`` pointing at the mutated copy, and reports killed / survived / timeout.

Usage (from the repository root, pvfast built):
    python3 fuzz/mutate_pv.py                       # default functions and tests
    python3 fuzz/mutate_pv.py --functions set_aside deinit_aside_vm --timeout 90 --list
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_FUNCS = ["set_aside", "destroy_lower_2g", "deinit_aside_vm", "deinit_cleanup_all", "dispose_one_leftover"]
DEFAULT_TESTS = ["tests/test_stateful.py", "tests/test_async.py", "tests/test_kvm_commands.py", "tests/test_faults.py"]

CMP_SWAP = {
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
}


def sites(func: ast.FunctionDef) -> list[tuple[str, list[int | str]]]:
    """(description, path) for every mutation site; a path indexes ``ast.walk`` order."""
    out: list[tuple[str, list[int | str]]] = []
    nodes = list(ast.walk(func))
    for i, node in enumerate(nodes):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Compare):
            for k, op in enumerate(node.ops):
                if type(op) in CMP_SWAP:
                    out.append((f"L{line}: {type(op).__name__} -> {CMP_SWAP[type(op)].__name__}", [i, 0, k]))
        elif isinstance(node, ast.BoolOp):
            out.append(
                (f"L{line}: {type(node.op).__name__} -> {'Or' if isinstance(node.op, ast.And) else 'And'}", [i, 1])
            )
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            out.append((f"L{line}: delete not", [i, 2]))
        elif isinstance(node, ast.If):
            out.append((f"L{line}: if c -> if not c", [i, 3]))
        elif isinstance(node, ast.AugAssign) and isinstance(node.op, (ast.Add, ast.Sub)):
            out.append((f"L{line}: {type(node.op).__name__}= swapped", [i, 4]))
        elif isinstance(node, ast.Constant) and type(node.value) is int:
            out.append((f"L{line}: {node.value} -> {node.value + 1}", [i, 5]))
        elif isinstance(node, ast.Constant) and type(node.value) is bool:
            out.append((f"L{line}: {node.value} -> {not node.value}", [i, 6]))
        if isinstance(node, (ast.FunctionDef, ast.If, ast.With, ast.For, ast.While, ast.Try)):
            for field in ("body", "orelse", "finalbody"):
                stmts = getattr(node, field, None) or []
                for k, stmt in enumerate(stmts):
                    if isinstance(stmt, (ast.Expr, ast.Assign, ast.AugAssign, ast.Return, ast.If, ast.With)) and not (
                        isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)
                    ):
                        out.append((f"L{stmt.lineno}: delete {type(stmt).__name__} in {field}", [i, 7, field, k]))
    return out


def apply(func: ast.FunctionDef, path: list) -> None:
    node = list(ast.walk(func))[path[0]]
    kind = path[1]
    if kind == 0:
        node.ops[path[2]] = CMP_SWAP[type(node.ops[path[2]])]()
    elif kind == 1:
        node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
    elif kind == 2:
        node.operand = ast.UnaryOp(op=ast.Not(), operand=node.operand)  # not (not x): the not is gone
    elif kind == 3:
        node.test = ast.UnaryOp(op=ast.Not(), operand=node.test)
    elif kind == 4:
        node.op = ast.Sub() if isinstance(node.op, ast.Add) else ast.Add()
    elif kind == 5:
        node.value = node.value + 1
    elif kind == 6:
        node.value = not node.value
    elif kind == 7:
        stmts = getattr(node, path[2])
        stmts[path[3]] = ast.Pass()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--functions", nargs="+", default=DEFAULT_FUNCS)
    ap.add_argument("--tests", nargs="+", default=DEFAULT_TESTS)
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--json", help="write the outcome of every mutant here")
    ap.add_argument("--match", help="only mutants whose description contains this text")
    args = ap.parse_args()

    source = (ROOT / "python/pvfast/pv.py").read_text()
    tree = ast.parse(source)
    funcs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    mutants = [(name, desc, path) for name in args.functions for desc, path in sites(funcs[name])]
    if args.match:
        mutants = [m for m in mutants if args.match in m[1]]
    if args.list:
        for name, desc, _ in mutants:
            print(f"{name}: {desc}")
        print(f"{len(mutants)} mutants")
        return 0

    with tempfile.TemporaryDirectory(prefix="pvfast-mut-") as tmp:
        work = Path(tmp)
        shutil.copytree(ROOT / "python/pvfast", work / "src/pvfast")
        shutil.copytree(ROOT / "tests", work / "tests", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(ROOT / "pyproject.toml", work / "pyproject.toml")
        target = work / "src/pvfast/pv.py"
        # A hypothesis profile without shrinking: a failing example is enough to kill a mutant.
        (work / "src/mutprofile.py").write_text(
            "from hypothesis import HealthCheck, Phase, settings\n"
            "settings.register_profile('mutation', max_examples=100, deadline=None, database=None,\n"
            "    phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))\n"
        )
        env = dict(os.environ, PYTHONPATH=str(work / "src"), PYTHONDONTWRITEBYTECODE="1", HYPOTHESIS_PROFILE="mutation")
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "mutprofile", *args.tests]

        def run() -> str:
            try:
                r = subprocess.run(cmd, cwd=work, env=env, capture_output=True, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                return "timeout"
            return "survived" if r.returncode == 0 else "killed"

        t0 = time.time()
        base = run()
        print(f"baseline: {base} ({time.time() - t0:.1f} s)", flush=True)
        if base != "survived":
            print("the unmutated code fails the selected tests; fix that first")
            return 2
        results = []
        for n, (name, desc, path) in enumerate(mutants, 1):
            t = copy.deepcopy(tree)
            f = next(x for x in t.body if isinstance(x, ast.FunctionDef) and x.name == name)
            apply(f, path)
            ast.fix_missing_locations(t)
            target.write_text(ast.unparse(t))
            t1 = time.time()
            outcome = run()
            results.append(
                {"function": name, "mutant": desc, "outcome": outcome, "seconds": round(time.time() - t1, 1)}
            )
            print(f"[{n}/{len(mutants)}] {outcome:8s} {name}: {desc}", flush=True)
        target.write_text(source)
    killed = sum(r["outcome"] in ("killed", "timeout") for r in results)
    print(f"score: {killed}/{len(results)} killed (timeouts count as killed) in {time.time() - t0:.0f} s")
    for r in results:
        if r["outcome"] == "survived":
            print(f"  survived: {r['function']}: {r['mutant']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
