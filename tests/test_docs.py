"""README.md and docs/ stay navigable: every relative link and #anchor resolves, every page is in the index, and the
configs they name exist. A moved file or a renamed heading fails here instead of leaving a dead link."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_CODE_SPAN = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)", re.S)
# [text](target) and ![alt](target); the text may hold one level of brackets (an image inside a link);
# the target may be <in angle brackets> and be followed by a "title".
_LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\(\s*(<[^>]*>|[^\s)]+)(?:\s+\"[^\"]*\")?\s*\)")
_HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"", re.I)


def prose(text: str) -> list[str]:
    """The lines GitHub renders as markdown: fenced code blocks blanked (kept as empty lines), comments removed."""
    out, fence = [], None
    for line in _COMMENT.sub(lambda m: "\n" * m.group(0).count("\n"), text).split("\n"):
        m = _FENCE.match(line)
        if fence is None and m:
            fence = m.group(1)[0]
            out.append("")
        elif fence is not None:
            if m and m.group(1)[0] == fence:
                fence = None
            out.append("")
        else:
            out.append(line)
    return out


def slug(heading: str) -> str:
    """GitHub's heading id: rendered text, lowercased, punctuation dropped except '-' and '_', spaces to '-'."""
    text = re.sub(r"!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\([^)]*\)", r"\1", heading)  # a link renders as its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)  # \w is Unicode-aware: letters such as α stay, symbols such as × go
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    found, seen = set(), {}
    for line in prose(text):
        found.update(_HTML_ANCHOR.findall(line))
        m = _HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(text: str) -> list[tuple[int, str]]:
    """(line number, target) of every inline link and image outside code."""
    found = []

    def scan(lineno: int, s: str) -> None:
        for m in _LINK.finditer(s):
            found.append((lineno, m.group(2).strip("<>")))
            scan(lineno, m.group(1))  # an image inside a link's text

    for i, line in enumerate(prose(text), 1):
        scan(i, _CODE_SPAN.sub("", line))
    return found


def broken_links(text: str, here: Path, read: Callable[[Path], str] = Path.read_text) -> list[str]:
    """Each link of `text` (a page in folder `here`) that does not resolve, as 'line N: target: why'."""
    own = anchors(text)
    bad = []
    for lineno, target in links(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http(s), mailto: not checked offline
            continue
        path, _, anchor = target.partition("#")
        path, anchor = unquote(path), unquote(anchor)
        why = ""
        if path.startswith("/"):
            why = "absolute path (write it relative to the page)"
        elif path and not (here / path).exists():
            why = "no such file"
        elif anchor:
            if not path:
                ok = anchor in own
            elif path.endswith(".md") and (here / path).is_file():
                ok = anchor in anchors(read(here / path))
            else:
                ok = True  # an anchor into a non-markdown file is a line reference, not a heading
            why = "" if ok else "no heading with this anchor"
        if why:
            bad.append(f"line {lineno}: {target}: {why}")
    return bad


# ------------------------------------------------------------------------------------------- the checker itself


def test_slug_follows_github():
    assert slug("Closed loop: the classifier steers the generator (`aug.adaptive`)") == \
        "closed-loop-the-classifier-steers-the-generator-augadaptive"
    assert slug("What `make demo` shows") == "what-make-demo-shows"
    assert slug("Speed and the GPU check") == "speed-and-the-gpu-check"
    assert slug("Models in models/") == "models-in-models"
    assert slug("run_dir and α × 2") == "run_dir-and-α--2"
    assert slug("See [the table](benchmark.md)") == "see-the-table"


def test_checker_finds_broken_links(tmp_path: Path):
    (tmp_path / "other.md").write_text("# Other page\n\n## A section\n\n## A section\n")
    (tmp_path / "img.png").write_bytes(b"")
    page = "\n".join([
        "# Title",
        "## Usage",
        "[ok](other.md) [ok](other.md#a-section) [ok](other.md#a-section-1) [ok](#usage) ![ok](img.png)",
        "[ok](https://example.com/missing.md) [ok](<other.md> \"title\") [![ok](img.png)](#title)",
        "`[in code](missing.md)`",
        "```",
        "[in a fence](missing.md)",
        "# not a heading",
        "```",
        "<!-- [in a comment](missing.md) -->",
        "[bad](missing.md) [bad](other.md#nowhere) [bad](#not-a-heading) [bad](other.md#a-section-2)",
        "[bad](/abs/path.md) ![bad](gone.png) [![bad](gone2.png)](#title)",
    ])
    bad = broken_links(page, tmp_path)
    assert [b.split(": ")[1] for b in bad] == ["missing.md", "other.md#nowhere", "#not-a-heading",
                                               "other.md#a-section-2", "/abs/path.md", "gone.png", "gone2.png"]
    assert all(b.startswith(("line 11:", "line 12:")) for b in bad)


# ------------------------------------------------------------------------------------------- the real pages


def test_every_link_resolves():
    bad = [f"{p.relative_to(ROOT)} {b}" for p in pages() for b in broken_links(p.read_text(), p.parent)]
    assert not bad, "broken links:\n" + "\n".join(bad)


def test_every_docs_page_is_indexed():
    index = DOCS / "README.md"
    linked = {(DOCS / t.partition("#")[0]).resolve() for _, t in links(index.read_text()) if t.partition("#")[0]}
    missing = [p.name for p in sorted(DOCS.glob("*.md")) if p != index and p.resolve() not in linked]
    assert not missing, f"docs/README.md does not list {missing}"
    assert "docs/README.md" in {t.partition("#")[0] for _, t in links((ROOT / "README.md").read_text())}


def test_named_files_exist():
    """Configs, modules, tools and tests named in prose (not only in links): a moved module leaves no stale path."""
    for p in pages():
        text = p.read_text()
        for cfg in re.findall(r"configs/[\w/.-]+\.yaml", text):
            assert (ROOT / cfg).is_file(), f"{p.relative_to(ROOT)} names {cfg}, which does not exist"
        for path in re.findall(r"(?<![\w/.-])((?:online_aug|tools|tests)/[\w/.-]*)", text):
            path = path.rstrip(".")
            assert (ROOT / path).exists(), f"{p.relative_to(ROOT)} names {path}, which does not exist"
