"""The shape of the package: no import cycles, full module names at import, installable next to other
packages (ranges in setup.py, the tested versions in constraints.txt)."""

import ast
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "grpo_jax")


# The import rule, as written: the package is layered, and a module imports only from its own
# subpackage and the layers before it. `rewards` stands beside the stack: it imports nothing of
# grpo_jax outside itself (and no JAX: reward workers start fast and never touch an accelerator), and
# the layers from `rollout` up may import it.
LAYERS = ("common", "parallel", "models", "rollout", "rl", "run")
SIDE = {"rewards": "rollout"}  # side subpackage -> the lowest layer that may import it


def module_imports() -> dict[str, set[str]]:
    """grpo_jax module ("rl.grpo") -> the grpo_jax modules it imports (anywhere in the file, lazy
    imports too)."""
    files = {}
    for folder, _, names in os.walk(PACKAGE):
        for name in names:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, name), PACKAGE)[:-3].replace(os.sep, ".")
                files[rel.removesuffix(".__init__").removesuffix("__init__")] = os.path.join(folder, name)
    edges = {m: set() for m in files}
    for m, path in files.items():
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "grpo_jax":
                base = node.module.split(".", 1)[1] if "." in node.module else ""
                for a in node.names:
                    full = f"{base}.{a.name}".strip(".")
                    edges[m].add(full if full in files else base)
            elif isinstance(node, ast.Import):
                edges[m] |= {a.name.split(".", 1)[1] for a in node.names if a.name.startswith("grpo_jax.")}
        edges[m].discard("")
    return edges


def layer_violations(edges: dict[str, set[str]]) -> list[str]:
    """Every import that breaks the rule above, as "importer -> imported"."""
    rank = {name: i for i, name in enumerate(LAYERS)}
    bad = []
    for m, deps in edges.items():
        top = m.split(".")[0]
        for d in deps:
            dtop = d.split(".")[0]
            if top == dtop:
                continue
            if top in SIDE:
                ok = False
            elif dtop in SIDE:
                ok = rank.get(top, -1) >= rank[SIDE[dtop]]
            else:
                ok = top in rank and dtop in rank and rank[dtop] < rank[top]
            if not ok:
                bad.append(f"{m} -> {d}")
    return sorted(bad)


def test_the_package_is_layered():
    edges = module_imports()
    assert {"run.trainer", "rl.grpo", "rl.sft", "rollout.policy", "rl.train_state", "parallel.multihost",
            "rollout.evaluation", "models.transformer", "rewards.scoring"} <= set(edges)
    assert set(m.split(".")[0] for m in edges if "." in m) == set(LAYERS) | set(SIDE)
    assert layer_violations(edges) == []
    # The rule finds planted arrows, so the pass above means something.
    assert layer_violations({**edges, "models.transformer": {"rl.loss"}}) == ["models.transformer -> rl.loss"]
    assert layer_violations({**edges, "rewards.scoring": {"parallel.multihost"}}) == [
        "rewards.scoring -> parallel.multihost"]
    assert layer_violations({**edges, "models.hf": {"rewards.math_grader"}}) == ["models.hf -> rewards.math_grader"]


def test_rewards_import_no_jax():
    code = ("import sys, grpo_jax.rewards.scoring, grpo_jax.rewards.verifier_pool, grpo_jax.rewards.pool_worker, "
            "grpo_jax.rewards.checks, grpo_jax.rewards.math_grader, grpo_jax.rewards.sandbox.runner; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax', 'optax')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(n, stack):
        state[n] = 1
        for k in sorted(edges.get(n, ())):
            if state.get(k) == 1:
                return stack[stack.index(k):] + [k]
            if k not in state and (c := visit(k, stack + [k])):
                return c
        state[n] = 2
        return None

    for n in sorted(edges):
        if n not in state and (c := visit(n, [n])):
            return c
    return None


def test_the_package_imports_no_module_in_a_circle():
    edges = module_imports()
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
    # The checker finds a planted cycle, so the pass above means something.
    assert find_cycle({**edges, "rl.loss": edges["rl.loss"] | {"run.trainer"}}) is not None


def python_files():
    for folder in ("grpo_jax", "scripts", "benchmarks", "tests", "configs"):
        for where, _, names in sorted(os.walk(os.path.join(ROOT, folder))):
            for name in sorted(names):
                if name.endswith(".py"):
                    yield os.path.relpath(os.path.join(where, name), ROOT)


def test_modules_are_imported_by_their_full_names():
    """`from grpo_jax.rollout import sampler`, never `... import sampler as S`: a grep finds every use."""
    aliased = []
    for path in python_files():
        tree = ast.parse(open(os.path.join(ROOT, path), encoding="utf-8").read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "grpo_jax":
                aliased += [f"{path}: {a.name} as {a.asname}" for a in node.names if a.asname]
    assert not aliased, aliased


def _requirements(text: str) -> dict[str, str]:
    return {re.split(r"[<>=!\[ ]", r, 1)[0].lower(): r for r in text}


def test_install_requires_are_ranges_and_constraints_pin_them():
    setup_src = open(os.path.join(ROOT, "setup.py"), encoding="utf-8").read()
    tree = ast.parse(setup_src)
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    kw = {k.arg: k.value for k in call.keywords}
    requires = _requirements(ast.literal_eval(kw["install_requires"]))
    assert {"jax", "flax", "optax", "orbax-checkpoint", "transformers", "safetensors", "datasets"} <= set(requires)
    pinned = [r for r in requires.values() if "==" in r]
    assert not pinned, f"install_requires should be compatible ranges, not exact pins: {pinned}"
    assert all(">=" in r for r in requires.values()), requires
    lines = [ln.split("#")[0].strip() for ln in open(os.path.join(ROOT, "constraints.txt"), encoding="utf-8")]
    constraints = {ln.split("==")[0].lower(): ln.split("==")[1] for ln in lines if ln}
    assert set(requires) <= set(constraints), set(requires) - set(constraints)
    assert constraints["torch"] == "2.13.0" and constraints["jax"] == "0.10.2"
    # Every pin lies inside its range (the ranges are checked with packaging's own rules).
    from packaging.requirements import Requirement

    for name, req in requires.items():
        assert Requirement(req).specifier.contains(constraints[name]), (req, constraints[name])
    setup_sh = open(os.path.join(ROOT, "scripts", "setup.sh"), encoding="utf-8").read()
    assert re.search(r'pip install -e "\.\[test,tensorboard\]" -c constraints\.txt', setup_sh)


@pytest.mark.parametrize("module", sorted(m for m in module_imports() if m))
def test_every_module_says_what_it_holds(module):
    import importlib

    doc = importlib.import_module(f"grpo_jax.{module}").__doc__
    assert doc and doc.strip(), module
    if module.split(".")[-1] in ("trainer", "grpo", "sft", "policy", "train_state", "multihost", "evaluation",
                                 "checkpoint", "config", "pipeline", "rejection", "transformer", "sampler"):
        assert len(doc.strip().splitlines()) >= 2, module
