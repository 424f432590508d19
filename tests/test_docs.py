"""The documentation is true: the docs site builds with warnings as errors, the README's quick start
runs as written, its links resolve, and the command-line reference lists exactly what `--help` says."""

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
CLI_DOC = os.path.join(ROOT, "docs", "cli.md")


def _env(**extra) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", NO_MKDOCS_2_WARNING="1", **extra)
    env.pop("XLA_FLAGS", None)  # the suite's 8 forced host devices are not what a user has
    # the venv's scripts (mi-jax, mkdocs) first on PATH, as for a user who activated it
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


def _section(text: str, heading: str) -> str:
    """The body of the `## heading` section of a markdown text (up to the next `## `)."""
    m = re.search(rf"^## {re.escape(heading)}\s*$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m, f"README.md has no '## {heading}' section"
    return m.group(1)


# ---------------------------------------------------------------------------- the docs site


def test_docs_build_strict(tmp_path):
    """`mkdocs build --strict` succeeds: no broken link or anchor, no page left out of the nav, every
    API page's object found and its docstring parsed without a warning."""
    try:
        import material  # noqa: F401
        import mkdocs  # noqa: F401
        import mkdocstrings_handlers.python  # noqa: F401
    except ImportError as e:
        pytest.fail(f"the docs need MkDocs, Material and mkdocstrings ({e}): pip install -e .[docs]")
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"mkdocs build --strict failed:\n{r.stdout[-4000:]}\n{r.stderr[-8000:]}"
    assert (site / "index.html").exists()
    api = (site / "api" / "pipeline" / "index.html").read_text()
    assert "from_checkpoint" in api and "generate" in api, "the API page lost Pipeline's methods"


# ---------------------------------------------------------------------------- the README


def test_readme_is_a_front_door():
    text = open(README).read()
    assert len(text.splitlines()) <= 250, "README.md grows past 250 lines: move detail into docs/"
    first_screen = "\n".join(text.splitlines()[:40])
    assert "make demo" in first_screen and "make test" in first_screen
    assert not re.search(r"\b20\d\d-\d\d-\d\d\b", text), "dates belong in CHANGELOG.md"
    hashes = re.findall(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b", text)
    assert not hashes, f"commit hashes belong in the git log: {hashes}"
    history = re.findall(r"\b(?:was|were|tried|before:)\b", text)
    assert not history, f"the README says what is, not what was: {history}"


def test_readme_links_resolve():
    """Every relative link of the README names a file of the repository, and every `#anchor` into a
    markdown file names one of its headings (as MkDocs and GitHub slug them)."""
    text = open(README).read()
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links
    for link in links:
        if re.match(r"[a-z]+://", link):
            continue
        path, _, anchor = link.partition("#")
        full = os.path.join(ROOT, path)
        assert os.path.exists(full), f"README links to {link}, which does not exist"
        if anchor:
            assert path.endswith(".md"), link
            slugs = {_slug(h) for h in re.findall(r"^#+ (.+?)\s*$", open(full).read(), re.M)}
            assert anchor in slugs, f"README links to {link}: no such heading in {path} ({sorted(slugs)})"


def _slug(heading: str) -> str:
    """Python-Markdown's toc slug (MkDocs' anchors): lower case, punctuation dropped, spaces -> '-'."""
    s = re.sub(r"[^\w\s-]", "", heading.replace("`", "")).strip().lower()
    return re.sub(r"[-\s]+", "-", s)


def test_readme_quick_start_runs(tmp_path):
    """Every ```python block of the README's quick start, in order, in one fresh interpreter, in a
    temporary folder beside a link to the repository's bundled demo/ (the quick start runs "from the
    repository root"): it writes the video it says it writes."""
    blocks = re.findall(r"^```python\n(.*?)^```", _section(open(README).read(), "Quick start"), re.M | re.S)
    assert blocks, "the README's quick start has no python block"
    os.symlink(os.path.join(ROOT, "demo"), tmp_path / "demo")
    script = tmp_path / "quick_start.py"
    script.write_text("\n\n".join(blocks))
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, f"the README's quick start failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    assert os.path.getsize(tmp_path / "talk.mp4") > 0
    assert "4.0 s" in r.stdout, r.stdout


# ---------------------------------------------------------------------------- the CLI reference


def _help(*args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "mi_jax.cli", *args, "--help"], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"mi-jax {' '.join(args)} --help failed:\n{r.stderr[-3000:]}"
    return r.stdout


def _options(help_text: str) -> set[str]:
    """The `--options` of a subcommand's help (its options list; -h/--help aside)."""
    body = help_text.split("options:", 1)[1]
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", body)) - {"--help"}


def _documented() -> dict[str, set[str]]:
    """docs/cli.md: `## mi-jax SUBCOMMAND` sections -> the `--options` of their option table."""
    text = open(CLI_DOC).read()
    sections = re.split(r"^## mi-jax ", text, flags=re.M)[1:]
    out = {}
    for s in sections:
        name, body = s.split("\n", 1)
        rows = [line for line in body.splitlines() if line.startswith("| `--")]
        out[name.strip()] = {o for row in rows for o in re.findall(r"`(--[a-z][a-z0-9-]*)`", row.split("|")[1])}
    return out


def test_cli_reference_matches_help():
    """`python -m mi_jax.cli --help` and every subcommand's `--help` agree with docs/cli.md: the same
    subcommands, and for each the same options."""
    top = _help()
    m = re.search(r"\{([a-z0-9,-]+)\}", top)
    assert m, top
    commands = m.group(1).split(",")
    with ThreadPoolExecutor(4) as pool:
        helps = dict(zip(commands, pool.map(_help, commands)))
    documented = _documented()
    assert sorted(documented) == sorted(commands), (
        f"docs/cli.md sections {sorted(documented)} against the CLI's subcommands {sorted(commands)}")
    for command, text in helps.items():
        have = _options(text)
        assert have, f"mi-jax {command} --help lists no options"
        assert documented[command] == have, (
            f"docs/cli.md, mi-jax {command}: documents {sorted(documented[command] - have)} that --help does "
            f"not list, and misses {sorted(have - documented[command])}")
    # the top-level help is the module docstring: every command it shows is a real one
    shown = set(re.findall(r"^\s+mi-jax ([a-z-]+)", top, re.M))
    assert shown <= set(commands), shown - set(commands)



def test_every_benchmark_is_documented():
    """Each script in benchmarks/ has its row in benchmarks/README.md and a mention in the docs."""
    scripts = sorted(f for f in os.listdir(os.path.join(ROOT, "benchmarks")) if f.endswith(".py"))
    readme = open(os.path.join(ROOT, "benchmarks", "README.md")).read()
    docs = open(os.path.join(ROOT, "docs", "benchmarks.md")).read()
    assert scripts
    for s in scripts:
        assert f"`{s}`" in readme, f"benchmarks/README.md has no row for {s}"
        assert s in docs, f"docs/benchmarks.md does not mention {s}"
