"""The documentation holds together: README.md and docs/*.md (issue #23 §3).

Fast and offline: it reads files only (no subprocess, no import of tskd's torch-heavy modules).

* every relative Markdown link resolves to a file or folder, and a ``#anchor`` into a Markdown
  file to one of its headings (GitHub's slugs);
* every repository path named in code (inline spans and fenced blocks), e.g.
  ``tskd/engine/trainer.py`` or ``slurm/local-cluster.sh``, exists; placeholders and globs
  (``*``, ``<``, ``{``, ``$``, ``...``) and what runs create (``results/``, ``data/``) are skipped;
* every dotted reference into the package (``tskd.engine.trainer``, ``tskd.spec.grid.RESULTS_FORMAT``)
  maps to a module file, and a name after the module occurs in that module's source;
* README.md stays short (at most 200 lines) and names the commands the Makefile and CI run.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOC_FILES = [README, *sorted((ROOT / "docs").glob("*.md"))]
MAX_README_LINES = 200

# Top-level entries of the repository: a token in code that starts with one of these is a path.
ROOT_DIRS = ("tskd", "tests", "slurm", "params", "workflow", "benchmarks", "examples", "docs", "profiles", ".ci",
             ".dvc")
ROOT_FILES = ("Snakefile", "Makefile", "dvc.yaml", "data.dvc", "pyproject.toml", "README.md", ".dvcignore",
              ".gitignore")
PLACEHOLDER = re.compile(r"[*<>{}$\[\]]|\.\.\.")
# Paths the docs name that a command writes, not the repository: `tskd scale-preset params/cifar100.yaml`.
GENERATED = {"params/cifar100_scale.yaml"}
# Dotted names that look like modules but are not: an MLflow tag (tskd/tracking/journal.py, JOURNAL_TAG).
NOT_MODULES = {"tskd.journal"}

FENCE = re.compile(r"^(\s*)(```+|~~~+)")
LINK = re.compile(r"(?<!\!)\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
MODULE_REF = re.compile(r"(?<![\w./-])tskd(?:\.[A-Za-z_]\w*)+")
TOKEN_SPLIT = re.compile(r"[\s=:,;()\"'`|]+")


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def split_code(text: str) -> tuple[list[str], list[str]]:
    """(prose lines, code lines): fenced blocks are code, the rest prose (inline spans stay in it)."""
    prose, code, fence = [], [], None
    for line in text.splitlines():
        m = FENCE.match(line)
        if fence is None and m:
            fence = m.group(2)[0] * 3
            continue
        if fence is not None:
            if line.strip().startswith(fence):
                fence = None
            else:
                code.append(line)
            continue
        prose.append(line)
    return prose, code


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: its text, lower case, without punctuation, spaces as hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images: their text
    text = text.replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    prose, _ = split_code(path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    out = set()
    for line in prose:
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> list[str]:
    prose, _ = split_code(path.read_text(encoding="utf-8"))
    out = []
    for line in prose:
        line = CODE_SPAN.sub(lambda m: " " * len(m.group(0)), line)  # `[a](b)` in code is no link
        out += [m.group(1) for m in LINK.finditer(line)]
    return out


def code_texts(path: Path) -> list[str]:
    """Every inline code span and every line of every fenced block."""
    prose, code = split_code(path.read_text(encoding="utf-8"))
    spans = [m.group(2) for line in prose for m in CODE_SPAN.finditer(line)]
    return spans + code


def repo_paths(text: str) -> list[str]:
    """The tokens of ``text`` that name a path in the repository, placeholders and generated files left out."""
    out = []
    for token in TOKEN_SPLIT.split(text):
        token = token.rstrip(".")
        if not token or PLACEHOLDER.search(token) or token in GENERATED:
            continue
        top = token.split("/", 1)[0]
        if (top in ROOT_DIRS and "/" in token) or token in ROOT_FILES:
            out.append(token)
    return out


def module_problem(ref: str) -> str | None:
    """Why ``ref`` (tskd.a.b.Name) does not resolve, or None: the longest prefix that is a module file
    or package, and the first name after it occurring in that module's source."""
    parts = ref.split(".")
    for i in range(len(parts), 0, -1):
        base = ROOT.joinpath(*parts[:i])
        source = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
        if not source.is_file():
            continue
        rest = parts[i:]
        if not rest:
            return None
        if re.search(rf"\b{re.escape(rest[0])}\b", source.read_text(encoding="utf-8")):
            return None
        return f"{rest[0]!r} is not in {rel(source)}"
    return "no such module"


@pytest.mark.parametrize("doc", DOC_FILES, ids=rel)
def test_relative_links_resolve(doc: Path):
    broken = []
    for target in sorted(set(links(doc))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        dest = (doc.parent / path_part).resolve() if path_part else doc
        if not dest.exists():
            broken.append(f"{target} (no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest})")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {rel(dest)})")
    assert not broken, f"{rel(doc)}: broken links: " + "; ".join(broken)


@pytest.mark.parametrize("doc", DOC_FILES, ids=rel)
def test_named_repository_paths_exist(doc: Path):
    missing = sorted({p for text in code_texts(doc) for p in repo_paths(text) if not (ROOT / p).exists()})
    assert not missing, f"{rel(doc)}: names paths that do not exist: {', '.join(missing)}"


@pytest.mark.parametrize("doc", DOC_FILES, ids=rel)
def test_module_references_resolve(doc: Path):
    refs = {m.group(0) for text in code_texts(doc) for m in MODULE_REF.finditer(text)} - NOT_MODULES
    broken = sorted(f"{ref} ({why})" for ref in refs if (why := module_problem(ref)))
    assert not broken, f"{rel(doc)}: module references that do not resolve: " + "; ".join(broken)


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_README_LINES, f"README.md: {n} lines, more than {MAX_README_LINES}: move detail into docs/"


def makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([A-Za-z][\w-]*)\s*:(?!=)", text, re.M))


def test_readme_commands_are_the_makefile_and_ci_commands():
    _, code = split_code(README.read_text(encoding="utf-8"))
    readme_make = {m.group(1) for line in code if (m := re.match(r"\s*make\s+([\w-]+)", line))}
    for target in ("demo", "test"):
        assert target in readme_make, f"README.md: no `make {target}` command in a code block"
    unknown = readme_make - makefile_targets()
    assert not unknown, f"README.md: `make {', '.join(sorted(unknown))}`: no such target in Makefile"

    ci = ROOT / ".ci" / "run"
    ci_make = [line.strip() for line in ci.read_text(encoding="utf-8").splitlines()
               if re.match(r"\s*make\s", line)]
    assert "make test" in ci_make, f".ci/run: does not run `make test` (runs: {ci_make})"
    for cmd in ci_make:
        assert cmd.split()[1] in readme_make, f"README.md: does not show `{cmd}`, the command .ci/run runs"
