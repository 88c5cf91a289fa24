"""What a ComfyUI user installs: the nodes need only requirements.txt (and ComfyUI's own torch)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Installed for the standalone engine (requirements-engine.txt) and the tests, never for the nodes: ComfyUI-Manager
# would put them into the shared ComfyUI environment, where they can move huggingface_hub and others.
NOT_FOR_NODES = ("diffusers", "peft", "tqdm", "transformers", "einops")

BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError("not installed for the nodes: " + name)
sys.meta_path.insert(0, Block())
for module in {modules!r}:
    __import__(module)
"""


def _engine_modules_the_nodes_import() -> list[str]:
    found = set()
    for path in (REPO / "nodes").glob("*.py"):
        found |= set(re.findall(r"^\s*from (zerase_core[\w.]*) import", path.read_text(), flags=re.MULTILINE))
    return sorted(found)


def test_the_engine_modules_the_nodes_use_import_without_the_engine_extras():
    modules = _engine_modules_the_nodes_import()
    assert "zerase_core.trainer" in modules and "zerase_core.backends.comfy_zimage" in modules
    code = BLOCKER.format(blocked=NOT_FOR_NODES, modules=modules)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_nodes_import_none_of_the_engine_extras_themselves():
    """The import check above runs the engine modules the nodes use; the nodes' own imports are read here."""
    import ast

    for path in [*(REPO / "nodes").glob("*.py"), REPO / "__init__.py"]:
        tree = ast.parse(path.read_text())
        names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        names |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        assert not {n.split(".")[0] for n in names} & set(NOT_FOR_NODES), path.name


def test_requirements_txt_holds_only_what_the_nodes_need():
    names = {re.split(r"[<>=\[ ]", line.strip())[0].lower() for line in (REPO / "requirements.txt").read_text()
             .splitlines() if line.strip() and not line.startswith("#")}
    assert names and not names & set(NOT_FOR_NODES)


def test_pyproject_lists_the_same_dependencies_as_requirements_txt():
    """The Comfy Registry reads pyproject.toml, ComfyUI-Manager and git installs requirements.txt: one list, twice."""
    tomllib = pytest.importorskip("tomllib")  # Python ≥ 3.11, as CI runs

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    required = [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    assert sorted(declared) == sorted(r for r in required if r)


# The folders ComfyUI's template browser reads a pack's example workflows from (app/custom_node_manager.py,
# example_workflow_folder_names, v0.18.1): it lists every one, so two of them would show each workflow twice.
TEMPLATE_FOLDERS = ("example_workflows", "example", "examples", "workflow", "workflows")


def test_the_template_browser_finds_each_workflow_once():
    found = [f.relative_to(REPO).as_posix() for name in TEMPLATE_FOLDERS for f in (REPO / name).glob("*.json")]
    names = [Path(f).name for f in found]
    assert len(names) == 4 and len(set(names)) == len(names), found


LOAD_AS_COMFYUI_DOES = """
import importlib.util, os, sys
spec = importlib.util.spec_from_file_location("ComfyUI-Z-Erase", {init!r}, submodule_search_locations=[{repo!r}])
pack = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = pack
spec.loader.exec_module(pack)
import zerase_core.trainer
print(zerase_core.__file__)
print(any(os.path.abspath(p) == {repo!r} for p in sys.path))
for name in ("tests", "tools", "scripts"):
    found = importlib.util.find_spec(name)
    print(found is not None and (found.origin or "").startswith({repo!r}))
"""


def _load_pack_as_comfyui(cwd, before: str = "") -> subprocess.CompletedProcess:
    """A fresh Python, without this checkout on its path, loading the pack as ComfyUI does (``before`` runs first)."""
    code = before + LOAD_AS_COMFYUI_DOES.format(init=str(REPO / "__init__.py"), repo=str(REPO))
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})


def test_loading_the_pack_offers_its_engine_by_name_and_nothing_else_of_its_folder(tmp_path):
    """The pack put its whole folder on sys.path: its tests, tools and scripts became top-level modules of every
    pack in the ComfyUI process (and an installed zerase_core of another version was imported before its own)."""
    done = _load_pack_as_comfyui(tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    engine, on_path, *offered = done.stdout.split()
    assert engine == str(REPO / "zerase_core" / "__init__.py")
    assert on_path == "False" and offered == ["False"] * 3


def test_a_zerase_core_imported_from_elsewhere_before_the_pack_is_told(tmp_path):
    """A pip-installed engine or a second copy of the pack, imported first, would silently run the nodes."""
    other = tmp_path / "elsewhere" / "zerase_core"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("")
    done = _load_pack_as_comfyui(tmp_path, f"import logging, sys; logging.basicConfig(); "
                                           f"sys.path.insert(0, {str(other.parent)!r}); import zerase_core\n")
    assert f"zerase_core was already imported from {other}, not from this pack" in done.stderr, done.stderr[-2000:]


FAIL_ONCE_THEN_LOAD_AGAIN = """
import importlib.abc, importlib.util, sys
class FailOnce(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "zerase_core.errors":
            sys.meta_path.remove(self)
            raise ImportError("a broken install")
sys.meta_path.insert(0, FailOnce())
def load():
    spec = importlib.util.spec_from_file_location("ComfyUI-Z-Erase", {init!r}, submodule_search_locations=[{repo!r}])
    pack = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = pack
    spec.loader.exec_module(pack)
try:
    load()
except ImportError as err:
    print("failed:", err)
print("zerase_core" in sys.modules)
load()
import zerase_core
print(zerase_core.ZEraseError.__name__)
"""


def test_an_engine_that_fails_while_it_is_imported_leaves_nothing_half_made(tmp_path):
    """An engine import that fails part way (a file missing from a broken install, Ctrl-C) leaves no zerase_core in
    sys.modules: the pack loaded again would take that half-made module for its engine without a word, and every
    node would fail on a name it lacks."""
    code = FAIL_ONCE_THEN_LOAD_AGAIN.format(init=str(REPO / "__init__.py"), repo=str(REPO))
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[:3] == ["failed: a broken install", "False", "ZEraseError"]


def test_the_version_is_one_in_pyproject_and_the_engine():
    """Stated twice (the registry reads pyproject.toml, Python the engine's __version__): a release bump must move
    both."""
    import zerase_core

    stated = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), flags=re.MULTILINE)
    assert stated and stated[1] == zerase_core.__version__


def test_the_shipped_workflows_are_the_generators_and_name_their_packs_and_model_files():
    """workflows/ is written by tools/make_workflows.py; a hand edit of one file would drift from it. Each UI node
    names its pack and version (the frontend's and ComfyUI-Manager's missing-node dialog), and each loader its model
    file with where to download it (the missing-model dialog), as ComfyUI's own blueprints do."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("make_workflows", REPO / "tools" / "make_workflows.py")
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    for name, build in make.WORKFLOWS.items():
        graph = build()
        assert json.loads((REPO / "workflows" / f"{name}.json").read_text()) == graph.ui()
        assert json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text()) == graph.api()
        for node in graph.ui()["nodes"]:
            if node["type"] == "MarkdownNote":  # the frontend's own, drawn and never queued
                continue
            ours = node["type"].startswith("ZErase")
            assert node["properties"]["cnr_id"] == ("z-erase" if ours else "comfy-core")
            models = node["properties"].get("models")
            if node["type"] in ("UNETLoader", "CLIPLoader", "VAELoader"):
                (model,) = models
                assert model["name"] == node["widgets_values"][0]  # the file the loader loads
                assert model["url"].endswith(f"/{model['directory']}/{model['name']}")
            else:
                assert models is None


def test_the_shipped_workflows_open_laid_out_left_to_right_without_overlaps():
    """What a user sees on opening a workflow: every link runs from left to right and no node (title bar included,
    which the frontend draws above a node's pos) covers another; they were set on a grid by the order they were
    added, so links ran backwards and the Train node's 17 widgets spilled out of its 200-px box over the next."""
    import json

    title = 30
    for path in sorted((REPO / "workflows").glob("*.json")):
        nodes = {n["id"]: n for n in json.loads(path.read_text())["nodes"]}
        boxes = {i: (n["pos"][0], n["pos"][1] - title, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
                 for i, n in nodes.items()}
        for a in boxes:
            for b in boxes:
                ax0, ay0, ax1, ay1 = boxes[a]
                bx0, by0, bx1, by1 = boxes[b]
                assert a == b or ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0, (path.name, a, b)
        for _, src, _, dst, _, _ in json.loads(path.read_text())["links"]:
            assert boxes[src][2] < boxes[dst][0], (path.name, src, dst)
        train = [n for n in nodes.values() if n["type"] == "ZEraseTrain"]
        assert all(n["size"][1] >= 24 * len(n["widgets_values"]) for n in train)  # room for every widget
