"""The documentation runs: every code block that can run on CPU is executed here, and the
mkdocs site builds in strict mode (a broken link or anchor, or a page left out of the nav,
fails it).

Which blocks run (README.md and docs/*.md):

| fence | what this file does with it |
|---|---|
| ```` ```python ```` | exec'd, each block in a fresh namespace (README and docs/) |
| ```` ```bash ```` | docs/ only: each command runs, in order, and must exit 0 |
| ```` ```console ```` | docs/ only: each `$ ` line runs; the lines under it, up to the next `$ `, are its expected output (stdout and stderr together); a line `...` stands for any lines, `...` inside a line for any text |
| ```` ```yaml ```` | docs/ only: parsed; when every top-level key is a recipe field, validated as a recipe |
| ```` ``` ````, ```` ```text ````, indented | shown only: output, formulas, layouts |

To show a block without running it, put `<!-- docs-test: skip: REASON -->` on the line right
above its opening fence: GPU launch lines, installs, runs that take minutes, files the reader
supplies. The reason is required. README's older spelling, a ```` ```python skip ```` info
string, still works there; mkdocs cannot render it, so docs/ pages use the comment. README's
shell blocks are install commands: `.ci/run` runs its test command verbatim.

Shell commands run in this process, in a scratch folder per page (shared by that page's
blocks, in order) holding a copy of `recipes/` and, when a command names `runs/quickstart` or
`runs/qs-3e-5`, a finished 2-step run of a scaled-down quickstart under each name (made once
per session). Understood: `urlvr ARGS` (or `.venv/bin/urlvr ARGS`), through `urlvr.cli.main`;
leading `NAME=value` words, which set environment variables for that command (`PYTHONPATH`
entries also go on `sys.path`, as they would in a new process); `cat > FILE <<'EOF'` ... `EOF`,
which writes FILE; comments and blank lines. Anything else fails the test: mark the block.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [REPO / "README.md", *DOCS]
FENCE = re.compile(r"^```(?P<lang>[\w+-]*)(?P<info>[^\n`]*)$")
SKIP_MARKER = re.compile(r"^<!-- docs-test: skip: (?P<reason>\S.*?) -->$")
RUN_LANGS = ("python", "bash", "console", "yaml")
SHOWN_LANGS = ("", "text")
HEREDOC = re.compile(r"^cat > (?P<path>\S+) <<-?'?(?P<end>\w+)'?$")
ENV_WORD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
URLVR = ("urlvr", ".venv/bin/urlvr")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    info: str  # the rest of the info string (README's legacy "skip")
    code: str
    skip_reason: str | None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"

    @property
    def runs(self) -> bool:
        return self.skip_reason is None and self.info.strip() != "skip"


def blocks(page: Path) -> list[Block]:
    """The page's fenced blocks (fences at column 0), with their skip markers."""
    lines = page.read_text().splitlines()
    found, index = [], 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        end = next((j for j in range(index + 1, len(lines)) if lines[j].startswith("```")), None)
        assert end is not None, f"{page.name}:{index + 1}: unclosed code fence"
        marker = SKIP_MARKER.match(lines[index - 1]) if index else None
        found.append(Block(page, index + 1, opening["lang"], opening["info"], "\n".join(lines[index + 1:end]) + "\n",
                           marker["reason"] if marker else None))
        index = end + 1
    return found


# --------------------------------------------------------------------------- python
@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_python_blocks_run(page):
    for block in blocks(page):
        if block.lang == "python" and block.runs:
            # dont_inherit: a block runs as a reader's own file, without this module's `from __future__` flags
            exec(compile(block.code, block.where, "exec", dont_inherit=True), {"__name__": f"docs_{page.stem}"})


def test_documented_reward_works_on_a_group():
    import torch

    from urlvr.rewards.base import REWARDS, RewardContext
    from urlvr.rollout.base import Group, PromptInput, Sample

    if "boxed_and_short" not in REWARDS:
        test_python_blocks_run(REPO / "docs" / "writing-rewards.md")
    samples = tuple(Sample((1,) * n, (0.0,) * n, "t", "eos") for n in (3, 70))
    group = Group(PromptInput("p", "q", (1,)), samples)
    ctx = RewardContext(answers=("4", "4"), response_mask=torch.ones(2, 70), token_stats={}, extract_answer=str)
    assert REWARDS.get("boxed_and_short").fn(group, ctx, max_tokens=64) == [1.0, 0.0]


def test_documented_engine_trains_a_step_with_its_own_knob(random_tiny_model, tmp_path, monkeypatch):
    """The plugin engine of docs/writing-engines.md, named in `plugins:` and selected with its own
    knob, trains one step on the tiny model and writes its transcript where the knob says."""
    import json

    from conftest import small_run_recipe

    import urlvr

    page = REPO / "docs" / "writing-engines.md"
    module = next(c.heredoc for b in blocks(page) if b.lang == "bash" for c in shell_commands(b)
                  if c.heredoc is not None and c.text.strip().startswith("cat > my_engines.py"))
    (tmp_path / "my_engines.py").write_text(module)
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = urlvr.load_recipe(small_run_recipe(
        random_tiny_model[0], tmp_path / "run", plugins=["my_engines"],
        rollout={"engine": {"name": "transcript", "transcript_file": "every-sample.jsonl", "generation_batch_size": 3},
                 "group_size": 2, "max_new_tokens": 4},
        trainer={"total_steps": 1, "prompts_per_step": 2, "prompts_per_minibatch": 2, "micro_batch_size": 4,
                 "save_every": 0, "export_final_model": False}))
    assert type(recipe.rollout.engine).__name__ == "TranscriptEngineSection"
    urlvr.train(recipe)
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in metrics] == [1]
    rows = [json.loads(line) for line in (tmp_path / "run" / "every-sample.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 and all(not row["greedy"] for row in rows)  # 2 prompts x 2 samples, nothing else
    saved = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())["rollout"]["engine"]
    assert saved == {"name": "transcript", "generation_batch_size": 3, "transcript_file": "every-sample.jsonl"}


# --------------------------------------------------------------------------- shell
@dataclass(frozen=True)
class Command:
    text: str  # the command line, continuation lines joined
    heredoc: str | None = None  # the body, for `cat > FILE <<'EOF'`
    expected: tuple[str, ...] | None = None  # console blocks: the expected output lines


def _read_command(lines: list[str], index: int) -> tuple[str, str | None, int]:
    """(command line, heredoc body or None, index of the next line) for the command at `index`."""
    text = lines[index].removeprefix("$ ")
    index += 1
    while text.endswith("\\") and index < len(lines):
        text = text[:-1] + " " + lines[index].strip()
        index += 1
    heredoc = HEREDOC.match(text.strip())
    if not heredoc:
        return text, None, index
    end = next((j for j in range(index, len(lines)) if lines[j].strip() == heredoc["end"]), None)
    assert end is not None, f"heredoc {text!r} has no {heredoc['end']} line"
    return text, "".join(line + "\n" for line in lines[index:end]), end + 1


def shell_commands(block: Block) -> list[Command]:
    lines, index, commands = block.code.splitlines(), 0, []
    if block.lang == "bash":
        while index < len(lines):
            if not lines[index].strip() or lines[index].lstrip().startswith("#"):
                index += 1
                continue
            text, body, index = _read_command(lines, index)
            commands.append(Command(text, body))
        return commands
    while index < len(lines):  # console: `$ ` lines, each followed by its output
        assert lines[index].startswith("$ "), f"{block.where}: a console block starts with a `$ ` line"
        text, body, index = _read_command(lines, index)
        output = []
        while index < len(lines) and not lines[index].startswith("$ "):
            output.append(lines[index])
            index += 1
        commands.append(Command(text, body, tuple(output)))
    return commands


def output_matches(expected: tuple[str, ...], actual: str) -> bool:
    """Line by line, blank lines ignored; a line `...` matches any lines, `...` in a line any text."""
    pattern = "".join(
        r"(?:[^\n]*\n)*?" if line.strip() == "..." else
        "[^\n]*?".join(re.escape(part) for part in line.rstrip().split("...")) + r"[ \t]*\n"
        for line in expected if line.strip()
    )
    text = "".join(line.rstrip() + "\n" for line in actual.splitlines() if line.strip())
    return re.fullmatch(pattern, text) is not None


@contextlib.contextmanager
def _environment(assignments: dict[str, str], cwd: Path):
    saved_env, saved_path = dict(os.environ), list(sys.path)
    os.environ.update(assignments)
    sys.path[:] = [entry for entry in sys.path if entry not in ("", ".")]  # the console script's view
    for entry in reversed(assignments.get("PYTHONPATH", "").split(os.pathsep)):
        if entry:
            sys.path.insert(0, str((cwd / entry).resolve()))
    importlib.invalidate_caches()  # modules the page has just written must be found
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        sys.path[:] = saved_path


def run_command(command: Command, block: Block, cwd: Path) -> tuple[int, str]:
    """Run one documented command in `cwd`; (exit code, stdout and stderr together)."""
    if command.heredoc is not None:
        target = cwd / HEREDOC.match(command.text.strip())["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(command.heredoc)
        return 0, ""
    words = shlex.split(command.text, comments=True)
    assignments = {}
    while words and ENV_WORD.match(words[0]):
        name, value = words.pop(0).split("=", 1)
        assignments[name] = value
    if not words or words[0] not in URLVR:
        pytest.fail(f"{block.where}: the docs test cannot run {command.text!r}; "
                    "put <!-- docs-test: skip: REASON --> above the block if it must not run")
    from urlvr.cli import main

    output = io.StringIO()
    with _environment(assignments, cwd), contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        try:
            code = main(words[1:])
        except SystemExit as exit_:  # argparse: --help, or a usage error
            code = exit_.code if isinstance(exit_.code, int) else 1
    return code, output.getvalue()


@pytest.fixture(scope="session")
def finished_runs(tmp_path_factory) -> Path:
    """A folder with `runs/quickstart` (the quickstart recipe, scaled down to 2 steps of 4
    prompts x 4 samples) and a copy of it at `runs/qs-3e-5`, for `urlvr plot` examples."""
    import urlvr

    root = tmp_path_factory.mktemp("finished_runs")
    overrides = [f"output_dir={root / 'runs' / 'quickstart'}", "trainer.total_steps=2", "trainer.prompts_per_step=4",
                 "trainer.prompts_per_minibatch=4", "trainer.micro_batch_size=16", "rollout.group_size=4",
                 "logging.console=false", "trainer.export_final_model=false"]
    urlvr.train(urlvr.load_recipe(REPO / "recipes" / "quickstart.yaml", overrides))
    shutil.copytree(root / "runs" / "quickstart", root / "runs" / "qs-3e-5")
    return root


SHELL_PAGES = [page for page in DOCS if any(b.lang in ("bash", "console") and b.runs for b in blocks(page))]


@pytest.mark.parametrize("page", SHELL_PAGES, ids=lambda p: p.name)
def test_shell_blocks_run(page, tmp_path, monkeypatch, request):
    shutil.copytree(REPO / "recipes", tmp_path / "recipes")
    monkeypatch.chdir(tmp_path)
    page_blocks = [b for b in blocks(page) if b.lang in ("bash", "console") and b.runs]
    if any(re.search(r"runs/(quickstart|qs-3e-5)\b", command.text) for b in page_blocks for command in shell_commands(b)):
        shutil.copytree(request.getfixturevalue("finished_runs") / "runs", tmp_path / "runs")
    for block in page_blocks:
        for command in shell_commands(block):
            code, output = run_command(command, block, tmp_path)
            shown = f"{block.where}: $ {command.text}\n--- output (exit {code}) ---\n{output}"
            if command.expected is None:
                assert code == 0, shown
            else:
                assert output_matches(command.expected, output), f"{shown}--- expected ---\n" + "\n".join(command.expected)
    if page.name in AFTER_PAGE:  # what the page's run claims, checked on the files it left
        AFTER_PAGE[page.name](tmp_path)


def _engine_example_trained_a_real_step(folder: Path) -> None:
    """writing-engines.md's engine trains a real step: answers end before the token cap, some group
    has a non-zero advantage, the optimizer step has a gradient (it trained on 8 truncated tokens
    with every advantage 0 before), and the transcript holds every sample."""
    run = folder / "runs" / "transcript"
    (metrics,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics["response/truncation_rate"] < 0.5, metrics
    assert metrics["reward/zero_variance_group_fraction"] < 1.0, metrics
    assert metrics["actor/grad_norm"] > 0 and metrics["loss/policy"] != 0, metrics
    assert len((run / "samples.jsonl").read_text().splitlines()) >= 4 * 4  # 4 prompts x 4 samples, and any greedy probe


AFTER_PAGE = {"writing-engines.md": _engine_example_trained_a_real_step}


# --------------------------------------------------------------------------- yaml
@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_yaml_blocks_parse_and_recipes_validate(page, tmp_path, monkeypatch):
    from urlvr.recipe import Recipe, load_recipe

    monkeypatch.chdir(tmp_path)
    for block in blocks(page):
        if block.lang != "yaml" or not block.runs:
            continue
        data = yaml.safe_load(block.code)
        if isinstance(data, dict) and data and set(data) <= set(Recipe.model_fields):
            load_recipe(data)  # RecipeError names the field


# --------------------------------------------------------------------------- conventions and the site
@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_every_block_is_run_or_marked(page):
    for block in blocks(page):
        assert block.lang in RUN_LANGS + SHOWN_LANGS, (
            f"{block.where}: fence language {block.lang!r}; use one of {RUN_LANGS + SHOWN_LANGS} (see tests/test_docs.py)")
        assert not block.info.strip(), (
            f"{block.where}: info string {block.info.strip()!r} after the language; mkdocs cannot render it "
            "(to keep a block from running, put <!-- docs-test: skip: REASON --> above it)")
    lines = page.read_text().splitlines() + [""]
    for number, line in enumerate(lines[:-1], start=1):
        if line.startswith("<!-- docs-test"):
            assert SKIP_MARKER.match(line), f"{page.name}:{number}: malformed marker; write <!-- docs-test: skip: REASON -->"
            assert FENCE.match(lines[number]), f"{page.name}:{number}: the marker is not right above a code fence"


def test_readme_links_resolve():
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", (REPO / "README.md").read_text()):
        if not re.match(r"[a-z]+:", target):
            assert (REPO / target).exists(), f"README.md links to {target}, which does not exist"


def test_landing_page_shows_the_readme_commands():
    def commands(path: Path) -> list[str]:
        return [b.code for b in blocks(path) if b.lang == "bash"][:2]

    assert commands(REPO / "docs" / "index.md") == commands(REPO / "README.md"), "docs/index.md and README.md disagree"


def test_site_builds_strictly(tmp_path):
    """`mkdocs build --strict`: any warning (broken link or anchor, page missing from the nav) fails."""
    try:
        import mkdocs  # noqa: F401
    except ImportError:
        pytest.fail("mkdocs is missing: pip install -e '.[dev]'")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}{proc.stderr}"
    assert (tmp_path / "site" / "index.html").is_file()
