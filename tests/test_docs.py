"""The repository documents itself: no file points outside it, and every docs link resolves.

Four checks, all static (no imports of the packages, so they run in well under a second):
1. no .py or .md file under the scanned packages (or docs/) refers to a path outside the
   repository (the pattern table below says what counts);
2. every markdown link in docs/ and README.md points at an existing file inside the repository
   and, where it names one, at an existing heading anchor (GitHub's slug rule);
3. every docs pointer written in code (a docs .md file with an optional #anchor) resolves;
4. every name the docs cite in backticks exists: test ids (a tests/ file with ::test_name
   parts), dotted names under `lumen` (module, then function, class or method) and repository
   paths; and no dotted name is cited under a bare package name (`engine.x` for
   `lumen.engine.x`), which is not importable.
"""
import ast
import functools
import re
from pathlib import Path

import pytest

from repo_layout import PACKAGES, REPO  # installed as lumen.<folder>

SCANNED = (*PACKAGES, "lumen", "tests", "docs")  # folders whose .py and .md files are scanned
SKIPPED_DIRS = {".venv", "__pycache__"}
DOCS = sorted((REPO / "docs").glob("*.md"))
README = REPO / "README.md"

# References to places outside the repository, and why each pattern means one. The name of the
# out-of-tree specification and the development machine's root are assembled from pieces, so
# this table does not match itself when this file is scanned like every other test file.
_SPEC = "SP" + "EC"
_ROOT = "/" + "work" + "/"
OUTSIDE_PATTERNS = {
    # a relative path that climbs out of the repository into a sibling "shared" folder
    "path into a sibling folder": re.compile(r"\.\.[/\\]shared\b"),
    # the specification file that lives beside the repository, by name or by its folder
    "out-of-tree specification file": re.compile(r"shared/" + _SPEC + r"|\b" + _SPEC + r"\.md\b"),
    # a section, test case or numbered part of that specification ("<name> section 6", "<name> 8")
    "section of the out-of-tree specification": re.compile(
        r"\b" + _SPEC + r"\s+(?:sections?\b|test\s+cases?\b|\d)"),
    # an absolute path on the machine the code was developed on
    "absolute path on a development machine": re.compile(r"(?<![\w.~-])" + re.escape(_ROOT)),
}



def rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def scanned_files() -> list[Path]:
    files = []
    for top in SCANNED:
        for path in sorted((REPO / top).rglob("*")):
            parts = set(path.relative_to(REPO).parts)
            if path.suffix in (".py", ".md") and path.is_file() and not parts & SKIPPED_DIRS:
                files.append(path)
    return files


@functools.lru_cache(maxsize=None)
def read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def outside_references(path: Path) -> list[str]:
    hits = []
    for n, line in enumerate(read(path).splitlines(), 1):
        for what, pattern in OUTSIDE_PATTERNS.items():
            if pattern.search(line):
                hits.append(f"{rel(path)}:{n}: {what}: {line.strip()}")
    return hits


# ---------------------------------------------------------------------------------------------
# Markdown: headings, anchors, links

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_DEF = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
EXTERNAL = ("http://", "https://", "mailto:")


def prose_lines(text: str):
    """(line number, line) outside fenced code blocks."""
    fenced = False
    for n, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield n, line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped (but - and _), spaces to -."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link counts as its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@functools.lru_cache(maxsize=None)
def anchors(path: Path) -> frozenset:
    """Every heading anchor of a markdown file; repeated headings get -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose_lines(read(path)):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return frozenset(found)


def links(path: Path):
    """(line number, target) of every inline link, image and link definition outside code."""
    for n, line in prose_lines(read(path)):
        line = CODE_SPAN.sub("", line)
        for m in LINK.finditer(line):
            yield n, m.group(1)
        m = REF_DEF.match(line)
        if m:
            yield n, m.group(1)


def link_problem(source: Path, target: str) -> str | None:
    """Why a link target does not resolve, or None."""
    if target.startswith(EXTERNAL):
        return None
    path_part, _, anchor = target.partition("#")
    dest = (source.parent / path_part).resolve() if path_part else source
    try:
        dest.relative_to(REPO)
    except ValueError:
        return f"{target} points outside the repository"
    if not dest.exists():
        return f"{target}: {path_part} does not exist"
    if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
        return f"{target}: no heading with anchor #{anchor} in {rel(dest)}"
    return None


def test_slug_follows_githubs_rule():
    assert slug("CFG with per-sample rescale") == "cfg-with-per-sample-rescale"
    assert slug("DPM-Solver++(2M)") == "dpm-solver2m"
    assert slug("SingDiffusion's initial step") == "singdiffusions-initial-step"
    assert slug("The `GraphKey` and snake_case") == "the-graphkey-and-snake_case"
    assert slug("Zero terminal SNR (Algorithm 1)") == "zero-terminal-snr-algorithm-1"


def test_repeated_headings_get_numbered_anchors(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Notes\n## Setup\n```\n# not a heading\n```\n## Setup\n## Setup\n")
    assert anchors(page) == {"notes", "setup", "setup-1", "setup-2"}


def test_no_file_refers_outside_the_repository():
    hits = [hit for path in scanned_files() for hit in outside_references(path)]
    assert not hits, "references outside the repository:\n" + "\n".join(hits)


def test_readme_does_not_refer_outside_the_repository():
    hits = outside_references(README)
    assert not hits, "\n".join(hits)


@pytest.mark.parametrize("page", [*DOCS, README], ids=rel)
def test_markdown_links_resolve(page):
    problems = [f"{rel(page)}:{n}: {p}" for n, target in links(page)
                if (p := link_problem(page, target)) is not None]
    assert not problems, "\n".join(problems)


def test_docs_exist_and_have_headings():
    assert [p.name for p in DOCS] == ["api.md", "architecture.md", "diffusers.md", "math.md",
                                      "serving.md"]
    assert all(anchors(p) for p in DOCS)


POINTER = re.compile(r"\bdocs/[\w./-]+?\.md(?:#[\w-]+)?")


def test_docs_pointers_in_code_resolve():
    problems, count = [], 0
    for path in scanned_files():
        for n, line in enumerate(read(path).splitlines(), 1):
            for pointer in POINTER.findall(line):
                count += 1
                problem = link_problem(REPO / "README.md", pointer)  # relative to the root
                if problem:
                    problems.append(f"{rel(path)}:{n}: {problem}")
    assert count > 0  # the code does point into docs/
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------
# Names cited in the docs

TEST_ID = re.compile(r"tests/[\w/]+\.py(?:::\w+)*")
DOTTED = re.compile(r"lumen(?:\.\w+)+")
BARE_DOTTED = re.compile(rf"(?:{'|'.join(PACKAGES)})(?:\.\w+)+")
REPO_PATH = re.compile(rf"(?:{'|'.join((*PACKAGES, 'lumen', 'tests', 'docs'))})/[\w./-]*")


def cited_names(page: Path, patterns=(TEST_ID, DOTTED, REPO_PATH)) -> list[str]:
    """Backticked spans of a page that are exactly one of patterns."""
    names = []
    for _, line in prose_lines(read(page)):
        for span in CODE_SPAN.findall(line):
            if any(p.fullmatch(span) for p in patterns):
                names.append(span)
    return names


@functools.lru_cache(maxsize=None)
def module_body(path: Path) -> tuple:
    return tuple(ast.parse(read(path)).body)


def defined(body, name: str):
    """(found, node) for name in a module or class body; node None for an imported name."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return True, node
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name
                                                for t in node.targets):
            return True, None
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
            return True, None
        if isinstance(node, (ast.Import, ast.ImportFrom)) and any(
                (a.asname or a.name.split(".")[0]) == name for a in node.names):
            return True, None
    return False, None


def names_exist(path: Path, names: list[str]) -> bool:
    """Whether names[0] is defined in the module at path, names[1] inside it, and so on."""
    body = module_body(path)
    for i, name in enumerate(names):
        found, node = defined(body, name)
        if not found:
            return False
        if i + 1 < len(names):
            if not isinstance(node, ast.ClassDef):
                return node is None  # an imported name: existence of its attributes not followed
            body = tuple(node.body)
    return True


def resolves(name: str) -> bool:
    if TEST_ID.fullmatch(name):
        file, *parts = name.split("::")
        return (REPO / file).is_file() and names_exist(REPO / file, parts)
    if DOTTED.fullmatch(name):
        parts = name.split(".")
        # lumen.<package> lives in the folder <package>/ (setup.py's package_dir), lumen.* else in lumen/
        parts = parts[1:] if len(parts) > 1 and parts[1] in PACKAGES else parts
        for i in range(len(parts), 0, -1):  # the longest prefix that is a module
            base = REPO.joinpath(*parts[:i])
            for module in (base.with_suffix(".py"), base / "__init__.py"):
                if module.is_file():
                    return names_exist(module, parts[i:])
        return False
    return (REPO / name).exists()


CITED = sorted({(rel(page), name) for page in [*DOCS, README] for name in cited_names(page)})


def _case(page: str, name: str):
    return pytest.param(page, name, id=f"{page}:{name}")


@pytest.mark.parametrize("page,name", [_case(p, n) for p, n in CITED])
def test_cited_name_exists(page, name):
    assert resolves(name), f"{page} cites `{name}`, which does not exist"


def test_docs_cite_no_bare_package_names():
    bare = [f"{rel(page)}: `{name}`" for page in [*DOCS, README]
            for name in cited_names(page, (BARE_DOTTED,))]
    assert not bare, "cite these as lumen.<name>:\n" + "\n".join(bare)


def test_resolver_finds_what_exists_and_only_that():
    assert resolves("lumen.engine.runtime.Engine.hand_over")
    assert resolves("lumen.engine.GraphCaptureError") and resolves("lumen.GraphCaptureError")
    assert resolves("lumen.cli.main") and resolves("lumen.build")
    assert resolves("tests/test_docs.py::test_resolver_finds_what_exists_and_only_that")
    assert resolves("kernels/aot.py") and resolves("lumen.kernels.guided_step")
    assert resolves("lumen/cli.py")
    assert not resolves("engine.runtime.Engine.hand_over")  # not importable: no lumen. prefix
    assert not resolves("lumen.engine.runtime.Engine.no_such_method")
    assert not resolves("tests/test_docs.py::test_no_such_test")
    assert not resolves("lumen.engine.no_such_module") and not resolves("lumen.no_such_module")
