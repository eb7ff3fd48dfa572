"""The repository's layout: the layers of its imports, the commands and links of its documents, and a
top level that holds only the paper's path.

- Imports (read with ast, imports inside functions included): nami.py imports nothing of ours, no
  module imports one of a higher layer, the scripts never import each other, and there is no cycle.
- Every `python SCRIPT.py`, `python -m MODULE`, `torchrun ... SCRIPT.py` and `pytest ... PATH` in the
  code of README.md and docs/*.md names something that exists, and every relative link of README.md,
  docs/*.md and results/*.md leads to a file.
- The top level holds nami, bridgeflow, train, sample and the tests of the method; no .py file is
  longer than 700 lines.

    python -m pytest -q tests/test_layout.py          # a second
"""
from __future__ import annotations

import ast
import importlib.util
import re
import shlex
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parent.parent
TOP = ("nami", "bridgeflow", "train", "sample")
FOLDERS = ("common", "datafeed", "training", "toyworld", "experiments")
# the layers: a module may import modules of its own layer or of a lower one
LAYER = {"nami": 0, "common": 0,
         "bridgeflow": 1, "toyworld": 1,
         "datafeed": 2, "training": 2,
         "train": 3, "sample": 3, "experiments": 3}
TOP_FILES = {"nami", "bridgeflow", "train", "sample", "test_nami", "conftest"}
MAX_LINES = 700


# ---------------------------------------------------------------------------------------------
# The import layers
# ---------------------------------------------------------------------------------------------

def our_modules() -> dict[str, Path]:
    """{dotted name: file} of every module of ours: the top-level scripts and every .py of the folders
    (a folder's __init__.py is the package itself)."""
    modules = {name: ROOT / f"{name}.py" for name in TOP}
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def is_script(name: str) -> bool:
    return name in ("train", "sample") or name.startswith("experiments.")


def imports_of(name: str, path: Path, modules: dict) -> set[str]:
    """The modules of ours that `name` imports, anywhere in the file: `from training import config` and
    `from training.config import X` are both training.config; `import training.config` likewise."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x, from ..a import b
                base = package.split(".")[:len(package.split(".")) - node.level + 1] if package else []
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            targets = [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:  # the longest prefix that is a module of ours
            parts = target.split(".")
            hit = next((".".join(parts[:n]) for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in modules), None)
            if hit and hit != name:
                found.add(hit)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = our_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def test_every_module_has_a_layer():
    loose = [n for n in import_graph() if n.split(".")[0] not in LAYER]
    assert not loose, f"modules outside the layers {sorted(LAYER)}: {loose}; give them a layer in tests/test_layout.py"
    folders = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert folders <= set(FOLDERS), f"packages at the top level that no layer holds: {sorted(folders - set(FOLDERS))}"


def test_nami_imports_nothing_of_ours():
    assert not import_graph()["nami"], f"nami.py imports {sorted(import_graph()['nami'])}: it must stand alone"


def test_no_module_imports_a_higher_layer_and_no_script_imports_another():
    graph, bad = import_graph(), []
    for name, targets in sorted(graph.items()):
        for target in sorted(targets):
            here, there = LAYER[name.split(".")[0]], LAYER[target.split(".")[0]]
            if there > here:
                bad.append(f"{name} (layer {here}) imports {target} (layer {there})")
            elif is_script(name) and is_script(target):
                bad.append(f"{name} imports {target}: scripts never import each other")
    assert not bad, "imports against the layers (0 nami, common; 1 bridgeflow, toyworld; 2 datafeed, training; " \
                    "3 train, sample, experiments):\n" + "\n".join(bad)


def test_no_import_cycle():
    graph, state, cycles = import_graph(), {}, []

    def visit(name, path):
        state[name] = "open"
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


# ---------------------------------------------------------------------------------------------
# The commands and links of the documents
# ---------------------------------------------------------------------------------------------

FENCE = re.compile(r"^ {0,3}(```|~~~)[^\n]*\n(.*?)^ {0,3}\1[ \t]*$", re.S | re.M)
INLINE = re.compile(r"(`+)(.+?)\1", re.S)
# modules that `python -m` runs but are not ours to check
NOT_OURS = {"torch", "pytest", "venv", "pip", "ensurepip", "http", "json", "cProfile", "profile", "timeit", "pdb",
            "unittest", "site", "tensorboard", "huggingface_hub"}


def documents(*patterns) -> list[Path]:
    return sorted({p for pattern in patterns for p in ROOT.glob(pattern) if p.is_file()})


def code_of(text: str) -> list[str]:
    """The code in a Markdown text: each fenced block's lines (a line ending in \\ joined to the next),
    then every inline code span outside them."""
    pieces = []
    for match in FENCE.finditer(text):
        pieces += match.group(2).replace("\\\n", " ").splitlines()
    pieces += [m.group(2) for m in INLINE.finditer(FENCE.sub("", text))]
    return pieces


def commands_in(code: str):
    """(kind, what, command) for each command in a piece of code, kind "script" (what: a path), "module"
    (a name) or "test" (a path)."""
    if re.fullmatch(r"[\w./-]+\.py::\S+", code.strip()):  # a test named alone: tests/test_x.py::test_y
        yield "test", code.strip(), code.strip()
        return
    for part in re.split(r"&&|\|\||;|\||\$\(|\)", code):
        try:
            words = shlex.split(part, comments=True)
        except ValueError:  # an unclosed quote: a fragment, not a command
            words = part.split()
        yield from ((kind, what, " ".join(part.split())) for kind, what in commands_in_words(words))


def commands_in_words(words: list[str]):
    """The command that `words` (one shell command) start somewhere: python, torchrun or pytest."""
    for i, word in enumerate(words):
        rest = words[i + 1:]
        if re.fullmatch(r"(.*/)?python3?(\.\d+)?", word):
            while rest and rest[0].startswith("-") and rest[0] not in ("-m", "-c"):
                rest = rest[1:]  # -u, -O, -X...: options of python itself
            if rest[:1] == ["-m"] and len(rest) > 1:
                yield "module", rest[1]
                if rest[1] == "pytest":
                    yield from (("test", w) for w in pytest_paths(rest[2:]))
            elif rest and rest[0].endswith(".py"):
                yield "script", rest[0]
            return
        if word == "torchrun":
            yield from (("script", w) for w in rest if w.endswith(".py") and not w.startswith("-"))
            if "-m" in rest[:-1]:
                yield "module", rest[rest.index("-m") + 1]
            return
        if word == "pytest":
            yield from (("test", w) for w in pytest_paths(rest))
            return


def pytest_paths(words):
    """The paths among pytest's arguments (test files, folders, FILE::test), not its options' values."""
    takes_value = {"-k", "-m", "-p", "-o", "-c", "-n", "--maxfail", "--durations", "--rootdir", "--basetemp", "-W"}
    skip = False
    for word in words:
        if skip:
            skip = False
        elif word.startswith("-"):
            skip = word in takes_value
        elif word.endswith((".py", "/")) or "::" in word or "/" in word or word == "tests":
            yield word


def test_every_command_of_the_documents_runs_something_that_exists():
    bad = {}  # in order, each once
    for doc in documents("*.md", "docs/*.md"):
        name = doc.relative_to(ROOT)
        for code in code_of(doc.read_text()):
            for kind, what, command in commands_in(code):
                command = command if len(command) < 100 else command[:97] + "..."
                if re.search(r"[A-Z<>{}$*]|\.\.\.", what.split("::")[0]) and kind != "module":
                    continue  # a placeholder (SCRIPT.py, <file>, $RUN, ...), not a path
                if kind in ("script", "test"):
                    path, *test = what.split("::")
                    if not (ROOT / path).exists():
                        bad[f"{name}: `{command}` names {path}, which does not exist"] = None
                    elif test and not re.search(rf"^\s*(async )?(def|class) {re.escape(test[0].split('[')[0])}\b",
                                                (ROOT / path).read_text(), re.M):
                        bad[f"{name}: `{command}` names {what}, but {path} has no {test[0]}"] = None
                elif what.split(".")[0] not in NOT_OURS and not re.search(r"[A-Z]{2,}|<", what):
                    if importlib.util.find_spec(what) is None:
                        bad[f"{name}: `{command}` runs python -m {what}, which is not a module"] = None
    assert not bad, "commands in the documents that name nothing:\n" + "\n".join(bad)


LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'][^)]*[\"'])?\s*\)")


def test_every_relative_link_of_the_documents_leads_to_a_file():
    bad = {}  # in order, each once
    for doc in documents("*.md", "docs/*.md", "results/*.md"):
        text = INLINE.sub("", FENCE.sub("", doc.read_text()))  # links inside code are code, not links
        for target in LINK.findall(text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # https:, mailto:, an anchor in the same file
            path = unquote(target.split("#")[0].split("?")[0])
            if not (doc.parent / path).exists():
                bad[f"{doc.relative_to(ROOT)}: the link ({target}) leads to no file"] = None
    assert not bad, "links in the documents that lead nowhere:\n" + "\n".join(bad)


# ---------------------------------------------------------------------------------------------
# The top level holds the paper's path; no file is long
# ---------------------------------------------------------------------------------------------

def test_the_top_level_holds_only_the_papers_path():
    top = {p.stem for p in ROOT.glob("*.py")}
    assert top == TOP_FILES, (f"the top level holds {sorted(top - TOP_FILES)} beyond the paper's path "
                              f"{sorted(TOP_FILES)}; move them into a folder" if top - TOP_FILES else
                              f"the top level lacks {sorted(TOP_FILES - top)}")


def test_every_python_file_is_at_most_700_lines():
    long = []
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).parts
        if any(p.startswith((".venv", ".git")) or p in ("__pycache__", "node_modules") for p in parts):
            continue
        with path.open(encoding="utf-8", errors="replace") as f:
            n = sum(1 for _ in f)
        if n > MAX_LINES:
            long.append(f"{path.relative_to(ROOT)}: {n} lines")
    assert not long, f"files over {MAX_LINES} lines (split them by topic):\n" + "\n".join(long)
