"""The structure the design card promises, checked: layers that only point down, no import
cycle, and code versions that cover every project module a stage really runs."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from dpoflow.config import load_config
from dpoflow.tasks.code_version import code_closure, imported_names
from tests.conftest import PROJECT_ROOT

# The build's own map of import names to folders: {"dpoflow": "core", "dpoflow.models": ...}.
PACKAGE_DIRS: dict[str, str] = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["tool"][
    "setuptools"
]["package-dir"]

# Lower imports nothing above it; packages of one rank never import each other.
RANK = {
    "dpoflow.errors": 0,
    "dpoflow.config": 1,
    "dpoflow.models": 2,
    "dpoflow.data_checks": 2,
    "dpoflow.tasks": 3,
    "dpoflow.flows": 4,
}
# Folders of data the product reads at run time, installed as packages of no code.
DATA_PACKAGES = {"dpoflow.configs", "dpoflow.deepspeed"}
# Top-level names the product must never import: the design card's folders under their own
# names (a neighbour's `models` package would be found instead), tests and benchmarks.
FOREIGN = ("models", "tasks", "flows", "data_checks", "core", "benchmarks", "tests")


def product_modules() -> dict[str, Path]:
    modules = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in sorted((PROJECT_ROOT / folder).glob("*.py")):
            modules[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return modules


MODULES = product_modules()


def home(module: str) -> str:
    """The layer a module belongs to: the longest RANK prefix (`dpoflow` itself: errors)."""
    matches = [p for p in RANK if module == p or module.startswith(p + ".")]
    return max(matches, key=len) if matches else "dpoflow.errors"


def project_imports(module: str) -> set[str]:
    """The product modules `module` imports (an imported attribute counts as its module)."""
    found = set()
    for name in imported_names(MODULES[module].read_text()):
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        if name != module and name.startswith("dpoflow."):  # the root package comes with any
            found.add(name)
    return found


def upward_imports(modules: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, imports in modules.items():
        for target in imports:
            a, b = home(module), home(target)
            if a != b and RANK[b] >= RANK[a]:
                bad.append(f"{module} imports {target} ({b} is not below {a})")
    return bad


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle, found by depth-first search (each reported once per start)."""
    found, done = [], set()

    def visit(node: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt in path:
                found.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in done:
                visit(nxt, path + [nxt])
        done.add(node)

    for start in sorted(graph):
        if start not in done:
            visit(start, [start])
    return found


def test_the_layout_is_the_one_pyproject_installs():
    code = set(RANK) - {"dpoflow.errors", "dpoflow.config"} | {"dpoflow"}
    assert set(PACKAGE_DIRS) == code | DATA_PACKAGES
    assert {"dpoflow.errors", "dpoflow.config"} <= set(MODULES)
    assert len(MODULES) > 30  # every folder was read


def test_layers_only_point_down_and_nothing_imports_benchmarks_or_tests():
    graph = {module: project_imports(module) for module in MODULES}
    assert upward_imports(graph) == []
    foreign = [
        f"{module} imports {name}"
        for module, path in MODULES.items()
        for name in imported_names(path.read_text())
        if name.split(".")[0] in FOREIGN
    ]
    assert foreign == []
    assert not project_imports("dpoflow.errors")
    assert project_imports("dpoflow.config") <= {"dpoflow.errors", "dpoflow.configs"}


def test_there_is_no_import_cycle():
    assert cycles({module: project_imports(module) for module in MODULES}) == []


def test_the_layer_and_cycle_checks_catch_what_they_guard():
    """The checks above are only worth their silence if they can speak."""
    up = {"dpoflow.models.trainer": {"dpoflow.tasks.launcher"}, "dpoflow.tasks.launcher": set()}
    assert upward_imports(up) == [
        "dpoflow.models.trainer imports dpoflow.tasks.launcher "
        "(dpoflow.tasks is not below dpoflow.models)"
    ]
    assert upward_imports({"dpoflow.models.judges": {"dpoflow.data_checks.suite"}})
    loop = {"dpoflow.models.judges": {"dpoflow.models.llm_judge"}}
    loop["dpoflow.models.llm_judge"] = {"dpoflow.models.judges"}
    assert cycles(loop)


# ---------------------------------------------------------------- code versions

# sitecustomize runs in every Python process started with this folder on PYTHONPATH: the
# stage's own process and the training processes the launcher starts for it.
RECORDER = """
import atexit, json, os, sys

def _record():
    names = sorted(m for m in sys.modules if m == "dpoflow" or m.startswith("dpoflow."))
    out = os.path.join(os.environ["DPOFLOW_IMPORTS_LOG"], f"{os.getpid()}.json")
    with open(out, "w") as f:
        json.dump(names, f)

atexit.register(_record)
"""

# Runs each stage's task body as an ordinary function, in a process of its own: a child forked
# from this driver, which has imported the libraries the stages use and no dpoflow module. A
# child so pays for none of those imports (seconds of CPU each), and its sys.modules still holds
# exactly the dpoflow modules its stage imported. It runs its exit handlers (the recorder among
# them) and then leaves with os._exit, skipping the interpreter's seconds-long teardown of all
# that the driver loaded. One line on stdin per stage: CALL.json OUT.json IMPORTS_LOG
# CONSOLE.log; one line back: the child's exit code.
DRIVER = """
import atexit, importlib, json, os, sys

replies, sys.stdout = sys.stdout, sys.stderr  # what libraries print stays off the replies
LIBRARIES = [
    "torch", "transformers", "deepspeed", "peft", "mlflow", "prefect", "great_expectations",
    "mlflow.store.tracking.sqlalchemy_store", "mlflow.store.model_registry.sqlalchemy_store",
    "matplotlib.pyplot", "vaderSentiment.vaderSentiment",
]
for name in LIBRARIES:
    importlib.import_module(name)
from transformers import AutoModelForCausalLM, AutoTokenizer  # resolved lazily otherwise

for line in sys.stdin:
    call_file, out, log, console = line.split()
    child = os.fork()
    if child == 0:
        os.environ["DPOFLOW_IMPORTS_LOG"] = log
        with open(console, "w") as f:
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
        call = json.load(open(call_file))
        stage = importlib.import_module(call["module"]).STAGE
        result = stage.task.fn(**call["params"])
        json.dump(result["manifest"], open(out, "w"))
        atexit._run_exitfuncs()  # the recorder of its imports among them
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    print(os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]), file=replies, flush=True)
"""

# Seconds one stage may take in the test below before it counts as hung.
STAGE_TIMEOUT = 600

# Just enough of every stage to run each line of it once.
TINY = [
    "sft.max_steps=2",
    "sft.batch_size=8",
    "dpo.max_steps=2",
    "dpo.batch_size=8",
    "dpo.checkpoint_every=1",
    "eval.num_prompts=4",
    "eval.max_new_tokens=4",
    "eval.temperatures=null",
]


@pytest.mark.slow
def test_each_stage_runs_only_modules_its_code_version_covers(tmp_path, cli_env):
    """Run every stage's code in its own process, in pipeline order, and compare the project
    modules those processes imported (training children included) with its derived closure."""
    from dpoflow.flows.pipeline import STAGES
    from dpoflow.tasks.sources import resolve_sources

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(RECORDER)
    (tmp_path / "driver.py").write_text(DRIVER)
    cfg = load_config(None, TINY)
    work = tmp_path / "work"
    manifests = resolve_sources(cfg, work)
    own = tmp_path / "imports" / "driver"  # the driver's own record: no dpoflow module
    own.mkdir(parents=True)
    env = cli_env | {"PYTHONPATH": str(site), "DPOFLOW_IMPORTS_LOG": str(own)}
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "text": True}
    driver = subprocess.Popen(
        [sys.executable, str(tmp_path / "driver.py")], env=env, start_new_session=True, **pipes
    )
    try:
        for stage in STAGES:
            run_stage_checking_its_imports(stage, driver, tmp_path, cfg, work, manifests)
        driver.stdin.close()
        assert driver.wait(timeout=60) == 0
    finally:  # a failed or hung stage: the driver and its child go with it
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    (record,) = own.iterdir()
    assert json.loads(record.read_text()) == []  # so each child began with no dpoflow module


def run_stage_checking_its_imports(stage, driver, tmp_path, cfg, work, manifests) -> None:
    """One stage in a fresh child of the driver; its processes' imports against its closure."""
    log = tmp_path / "imports" / stage.name
    log.mkdir(parents=True)
    call = {"module": stage.module, "params": stage.call(cfg, work, manifests)}
    call_file = tmp_path / f"{stage.name}-call.json"
    call_file.write_text(json.dumps(call))
    out, console = tmp_path / f"{stage.name}.json", tmp_path / f"{stage.name}.log"
    driver.stdin.write(f"{call_file} {out} {log} {console}\n")
    driver.stdin.flush()
    answered, _, _ = select.select([driver.stdout], [], [], STAGE_TIMEOUT)
    assert answered, f"{stage.name} did not end within {STAGE_TIMEOUT} s"
    exit_code = driver.stdout.readline().strip()
    assert exit_code == "0", f"{stage.name}: exit {exit_code!r}\n" + console.read_text()[-3000:]
    manifests[stage.name] = json.loads(out.read_text())
    imported = {m for f in log.iterdir() for m in json.loads(f.read_text())}
    processes = len(list(log.iterdir()))
    if stage.name in ("sft", "dpo"):  # the stage's process, the launcher's, the trainer's
        assert processes >= 3
    assert stage.module in imported
    missing = imported - set(code_closure(stage.module))
    assert not missing, f"{stage.name} ran {sorted(missing)} outside its code version"
    print(f"{stage.name}: {len(imported)} modules in {processes} processes, all covered")


def test_an_edit_deep_in_promotes_closure_changes_its_key_and_not_validates(tmp_path):
    """In a copy of the repository: one line added to the generation code (promote samples
    the head-to-head with it) changes promote's key; validate's stays."""
    from dpoflow.flows.pipeline import STAGES

    stages = {stage.name: stage for stage in STAGES}
    copy = tmp_path / "repo"
    for folder in PACKAGE_DIRS.values():
        shutil.copytree(PROJECT_ROOT / folder, copy / folder)
    cfg = load_config(None, [])
    manifests = {
        name: {"path": "/x", "sha256": name, "data_sha256": "d", "prompts_sha256": "p"}
        for name in ("base_model", "train_data", "eval_data", "validate")
    } | {"register": {"registered": "dpoflow-policy:1"}}

    def keys(root: Path) -> dict[str, str]:
        return {
            name: stages[name].call(cfg, tmp_path, manifests, code_root=root)["key"]
            for name in ("validate", "promote")
        }

    before = keys(copy)
    assert before == keys(PROJECT_ROOT)  # a faithful copy hashes like the original
    deep = copy / "models" / "generation.py"
    assert "dpoflow.models.generation" in code_closure(stages["promote"].module)
    assert "dpoflow.models.generation" not in code_closure(stages["validate"].module)
    deep.write_text(deep.read_text() + "\n# one more line\n")
    after = keys(copy)
    assert after["promote"] != before["promote"]
    assert after["validate"] == before["validate"]


def test_a_spurious_ast_system_error_is_parsed_again_and_a_lasting_one_raised(monkeypatch):
    """CPython 3.11's AST builder can raise SystemError when another thread builds an AST at
    the same moment (python/cpython#106905): a stage key must not fail a run for it."""
    import ast

    from dpoflow.tasks import code_version

    real, calls = ast.parse, []

    def flaky(source, *args, **kwargs):
        calls.append(source)
        if len(calls) < code_version.PARSE_ATTEMPTS:
            raise SystemError("AST constructor recursion depth mismatch (before=51, after=96)")
        return real(source, *args, **kwargs)

    def broken(source, *args, **kwargs):
        raise SystemError("AST constructor recursion depth mismatch (before=1, after=2)")

    # ast.parse is patched only around each call: pytest parses too, to report a failure.
    with monkeypatch.context() as patch:
        patch.setattr(ast, "parse", flaky)
        tree = code_version.parse("import dpoflow.models.trainer")
    assert tree.body and len(calls) == code_version.PARSE_ATTEMPTS
    with monkeypatch.context() as patch, pytest.raises(SystemError):
        patch.setattr(ast, "parse", broken)
        code_version.parse("import os")


def test_no_stage_lists_its_code_by_hand():
    """Code versions are derived: no stage module names project source files."""
    for module, path in MODULES.items():
        if module.startswith("dpoflow.tasks.") or module.startswith("dpoflow.flows."):
            text = path.read_text()
            assert not any(f'"{d}/' in text for d in PACKAGE_DIRS.values()), module


def test_the_installed_distribution_claims_only_dpoflow():
    """`pip install` puts one top-level name on sys.path, not `models`, `tasks`, ..."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = f"import importlib.util as u; print([n for n in {FOREIGN!r} if u.find_spec(n)])"
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd="/", env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def stage_table() -> str:
    """The stage table of docs/architecture.md, derived from the stage declarations."""
    from dpoflow.flows.pipeline import STAGES

    cfg = load_config(None, [])
    rows = [
        "| stage | config it reads | inputs of its key (from upstream manifests) | code closure |",
        "|---|---|---|---|",
    ]
    for stage in STAGES:
        reads = ", ".join(f"`{k}`" for k in stage.reads(cfg, None))
        inputs = ", ".join(f"{label} ← `{ref}`" for label, ref in stage.inputs.items())
        closure = ", ".join(
            f"`{name.removeprefix('dpoflow.')}`"
            for name, path in code_closure(stage.module).items()
            if path.stem != "__init__"  # modules; their packages come with them
        )
        rows.append(f"| **{stage.name}** | {reads} | {inputs} | {closure} |")
    return "\n".join(rows)


def test_the_architecture_doc_shows_the_derived_stage_table():
    table = stage_table()
    doc = (PROJECT_ROOT / "docs" / "architecture.md").read_text()
    assert table in doc, "docs/architecture.md is stale; its stage table is now:\n" + table
