"""The README stays true to the tree: its file table's line counts, its links into RESULTS.md, and the
files its commands name."""
import re
import unicodedata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
RESULTS = (ROOT / "RESULTS.md").read_text(encoding="utf-8")


def line_count(path):
    """What `wc -l` prints: the number of newline characters."""
    return path.read_bytes().count(b"\n")


def file_table(text):
    """{name: lines} from the README's table rows of the form | `name` | lines | ... |."""
    rows = re.findall(r"^\| `([^`]+)` \| (\d+) \|", text, flags=re.M)
    return {name: int(lines) for name, lines in rows}


def github_anchor(heading):
    """GitHub's anchor for a heading: markup dropped, lowercased, punctuation removed, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # [text](url) -> text
    text = text.replace("`", "").strip().lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


def anchors(text):
    """Every heading's anchor in a Markdown text, with GitHub's -1, -2 suffixes for repeats."""
    seen, out = {}, set()
    in_code = False
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        m = None if in_code else re.match(r"#{1,6} (.+)", line)
        if m:
            base = github_anchor(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def test_file_table_lists_every_top_level_file_with_its_line_count():
    table = file_table(README)
    on_disk = sorted(p.name for p in ROOT.glob("*.py"))
    assert on_disk, "no top-level .py files found"
    missing = [name for name in on_disk if name not in table]
    assert not missing, f"README's file table lacks {missing}"
    wrong = {name: (table[name], line_count(ROOT / name)) for name in on_disk
             if table[name] != line_count(ROOT / name)}
    assert not wrong, f"README line counts (table, wc -l) differ: {wrong}; `python tests/test_readme.py` refreshes them"
    gone = [name for name in table if name != "tests/" and not (ROOT / name).exists()]
    assert not gone, f"README's file table names files that do not exist: {gone}"


def test_file_table_counts_the_tests():
    table = file_table(README)
    assert "tests/" in table, "README's file table has no tests/ row"
    total = sum(line_count(p) for p in (ROOT / "tests").glob("*.py"))
    assert table["tests/"] == total, (f"tests/ row says {table['tests/']} lines, wc -l tests/*.py gives {total}; "
                                      "`python tests/test_readme.py` refreshes it")


def test_links_into_results_resolve():
    links = re.findall(r"\(RESULTS\.md#([^)\s]+)\)", README)
    assert links, "README links to no RESULTS.md section"
    known = anchors(RESULTS)
    broken = sorted(set(links) - known)
    assert not broken, f"README links to RESULTS.md anchors that no heading makes: {broken}"


def test_links_inside_results_resolve():
    known = anchors(RESULTS)
    broken = sorted(set(re.findall(r"\]\(#([^)\s]+)\)", RESULTS)) - known)
    assert not broken, f"RESULTS.md links to anchors that no heading makes: {broken}"


def test_github_anchor_rules():
    assert github_anchor("PG+EE") == "pgee"
    assert github_anchor("ACT and DACT") == "act-and-dact"
    assert github_anchor("The `laptop` preset: MAC (2-core)") == "the-laptop-preset-mac-2-core"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n") == {"a", "a-1"}


def test_every_python_file_the_readme_runs_exists():
    named = set(re.findall(r"\bpython ([\w./-]+\.py)\b", README))
    named |= set(re.findall(r"\btorchrun [^\n]*?([\w./-]+\.py)\b", README))
    assert named, "README names no python files to run"
    missing = sorted(name for name in named if not (ROOT / name).is_file())
    assert not missing, f"README runs files that do not exist: {missing}"


def refresh_counts():
    """Rewrite the README's file table with the line counts of the files as they are now."""
    def count(name):
        files = (ROOT / "tests").glob("*.py") if name == "tests/" else [ROOT / name]
        return sum(line_count(f) for f in files if f.exists())
    text = re.sub(r"^\| `([^`]+)` \| \d+ \|", lambda m: f"| `{m.group(1)}` | {count(m.group(1))} |", README, flags=re.M)
    (ROOT / "README.md").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    refresh_counts()
