"""README.md is for users: short, the two commands first, and its claims about the code checked against the code.

The stage table must list every stage a spec can name, with each stage's kind and node count from the registry,
and a LoRA (vLLM) mark exactly where the stage's config has a `lora` (`rollout`) part; the demo's DAG and the spec
excerpt must be the demo spec's; every `posttrain` command shown must be one the parser has (with its flags), every
bundled spec it names must exist, and every relative link of README.md and docs/*.md must reach a file (and a
heading, when it names one).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path

import yaml

from components.stages import STAGES, spec_kinds

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
SPECS = ROOT / "pipelines" / "specs"
FIRST_SCREEN = 25
FENCE = re.compile(r"^```[^\n]*\n.*?^```[ \t]*$", re.M | re.S)


def _readme() -> str:
    return README.read_text()


def _section(text: str, title: str) -> str:
    head = f"\n## {title}\n"
    assert head in text, f"README.md: no section '## {title}'"
    return text.split(head, 1)[1].split("\n## ", 1)[0]


def _stage_table() -> dict[str, dict[str, str]]:
    """The rows of the README's stage table: stage name -> {column: cell}."""
    lines = [line.strip() for line in _section(_readme(), "Stages").splitlines() if line.startswith("|")]
    assert len(lines) > 2, "README.md: the Stages section has no table"
    header, *rows = ([c.strip() for c in line.strip("|").split("|")] for line in lines)
    table = {cells[0].strip("`"): dict(zip(header[1:], cells[1:], strict=True)) for cells in rows[1:]}
    for column in ("kind", "nodes", "LoRA", "vLLM"):
        assert column in header, f"README.md: the stage table has no column {column!r}"
    return table


def _config_fields(stage: str) -> set[str]:
    return {f.name for f in dataclasses.fields(STAGES[stage].config_class())}


def _code(text: str) -> list[str]:
    """The lines of fenced code blocks and the inline code spans of the text outside them."""
    blocks = FENCE.findall(text)
    spans = re.findall(r"`([^`\n]+)`", FENCE.sub("", text))
    return [line for b in blocks for line in b.splitlines()[1:-1]] + spans


def _subparsers() -> dict:
    import argparse

    from pipelines.cli import parser

    (action,) = [a for a in parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices


def _slugs(md: Path) -> Iterator[str]:
    """GitHub's heading anchors of a markdown file (headings inside code blocks are not headings)."""
    seen: dict[str, int] = {}
    for title in re.findall(r"^#{1,6} +(.+?) *#*$", FENCE.sub("", md.read_text()), re.M):
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        seen[slug] = seen.get(slug, -1) + 1
        yield slug if seen[slug] == 0 else f"{slug}-{seen[slug]}"


def test_readme_is_short_and_shows_the_two_commands_first():
    lines = _readme().splitlines()
    assert len(lines) <= 200, f"README.md: {len(lines)} lines; at most 200 (details go to docs/)"
    first = "\n".join(lines[:FIRST_SCREEN])
    for command in ("make run", "make test"):
        assert re.search(rf"^{command}\b", first, re.M), f"README.md: `{command}` not in its first {FIRST_SCREEN} lines"


def test_the_stage_table_is_the_registry():
    rows = _stage_table()
    assert not set(rows) - set(STAGES), f"README.md lists stages the registry lacks: {sorted(set(rows) - set(STAGES))}"
    missing = [k for k in spec_kinds() if k not in rows]
    assert not missing, f"README.md's stage table lacks spec stages: {missing}"
    said = {name: (row["kind"], row["nodes"]) for name, row in rows.items()}
    real = {name: (STAGES[name].kind, "several" if STAGES[name].multi_node else "one") for name in rows}
    wrong = {name: f"{said[name]} (registry: {real[name]})" for name in rows if said[name] != real[name]}
    assert not wrong, f"README.md: (kind, nodes) differ from components/stages.py: {wrong}"


def test_the_stages_said_to_take_lora_or_vllm_are_those_whose_config_has_it():
    rows = _stage_table()
    for column, part in (("LoRA", "lora"), ("vLLM", "rollout")):  # a `rollout` part picks the engine, vllm or hf
        said = {name for name, row in rows.items() if row[column].lower() == "yes"}
        has = {name for name in rows if part in _config_fields(name)}
        assert said == has, f"README.md: {column} marked for {sorted(said)}, but the configs with `{part}` are " \
                            f"{sorted(has)}"


def test_the_demo_chain_is_the_demo_spec():
    spec = yaml.safe_load((SPECS / "demo.yaml").read_text())
    stages = [s.get("name", s["stage"]) for s in spec["stages"]]
    chains = [line for line in _readme().splitlines() if line.startswith("preflight → data_prep → ")]
    assert chains, "README.md: no line starts with the demo's DAG (preflight → data_prep → ...)"
    steps = chains[0].rstrip(".").split(" → ")
    assert steps == ["preflight", "data_prep", *stages, "promotion gate"], (
        f"README.md shows the demo as {' → '.join(steps)}; pipelines/specs/demo.yaml runs {' → '.join(stages)}")


def _within(part, whole) -> bool:
    """`part` is `whole` with keys and list items left out (list items in order)."""
    if isinstance(part, dict):
        return isinstance(whole, dict) and all(k in whole and _within(v, whole[k]) for k, v in part.items())
    if isinstance(part, list):
        rest = iter(whole) if isinstance(whole, list) else iter(())
        return all(any(_within(p, w) for w in rest) for p in part)
    return part == whole


def test_the_spec_excerpt_is_a_valid_shortened_demo_spec():
    from pipelines.spec import parse_spec

    blocks = re.findall(r"^```yaml\n(.*?)^```", _section(_readme(), "The spec in brief"), re.M | re.S)
    assert blocks, "README.md: the spec section has no ```yaml block"
    excerpt = yaml.safe_load(blocks[0])
    parse_spec(excerpt, where="README.md")
    assert _within(excerpt, yaml.safe_load((SPECS / "demo.yaml").read_text())), (
        "README.md: the spec excerpt is not pipelines/specs/demo.yaml shortened (a key or value differs)")


def test_every_bundled_spec_is_named_and_every_named_one_exists():
    text = _readme()
    listed = re.search(r"Bundled specs \(`pipelines/specs/`\):(.*?)(?:\n\n|\Z)", text, re.S)
    assert listed, "README.md: no sentence 'Bundled specs (`pipelines/specs/`): ...'"
    named = set(re.findall(r"`([a-z0-9-]+)`", listed.group(1)))
    bundled = {p.stem for p in SPECS.glob("*.yaml")}
    assert named == bundled, f"README.md names bundled specs {sorted(named)}; pipelines/specs/ has {sorted(bundled)}"
    for line in _code(text):
        for name in re.findall(r"\bposttrain (?:run|compile|submit|schedule) ([a-z][a-z0-9-]*)\b", line):
            assert name in bundled, f"README.md: `{line.strip()}` names no bundled spec (pipelines/specs/{name}.yaml)"


def test_every_posttrain_command_shown_is_one_the_parser_has():
    import argparse

    commands = _subparsers()
    shown = 0
    for line in _code(_readme()):
        for m in re.finditer(r"^\s*posttrain ([a-z][\w-]*(?:\|[a-z][\w-]*)*)", line):  # a line or span that shows one
            shown += 1
            for name in m.group(1).split("|"):
                assert name in commands, f"README.md: `{line.strip()}`: posttrain has no command {name!r}"
                sub = commands[name]
                if any(a.nargs == argparse.REMAINDER for a in sub._actions):
                    continue  # it parses its own flags (bench, models, stack, stage)
                usage = re.split(r"\s{2,}", line[m.start():].strip())[0]  # the command, not its description
                flags = set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", usage))
                unknown = flags - {o for a in sub._actions for o in a.option_strings}
                assert not unknown, f"README.md: `{usage}`: posttrain {name} has no {sorted(unknown)}"
    assert shown >= 5, "README.md shows fewer than 5 posttrain commands: the CLI section is missing"


def test_relative_links_resolve():
    docs = [README, *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for md in docs:
        for target in re.findall(r"\]\(([^)\s]+)\)", FENCE.sub("", md.read_text())):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):
                continue  # https:, mailto:
            path, _, anchor = target.partition("#")
            file = (md.parent / path).resolve() if path else md
            if not file.exists():
                broken.append(f"{md.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in set(_slugs(file)):
                broken.append(f"{md.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_readme_links_every_page_of_docs():
    text = _readme()
    unlinked = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if f"](docs/{p.name})" not in text]
    assert not unlinked, f"README.md does not link these pages of docs/: {unlinked}"


def test_prose_references_to_a_section_name_a_heading_of_that_file():
    """`see docs/design.md, "Rollout engines"` in code, comments and docs: the file exists and has a heading that
    starts with those words (a section moved or renamed leaves no reference pointing at nothing)."""
    ref = re.compile(r'([\w./-]+\.md), "([^"]{1,80})"')
    ours = ("README.md", "docs/", "components/", "k8s/", "pipelines/", "tests/", "images/")
    files = [p for p in ROOT.rglob("*") if p.suffix in (".py", ".md", ".yaml", ".txt")
             and not {".venv", ".git", "upstream", ".posttrain", "node_modules"} & set(p.parts)]
    broken, seen = [], 0
    for f in files:
        for target, section in ref.findall(f.read_text(errors="replace")):
            md = next((c for c in (ROOT / target, f.parent / target) if c.is_file()), None)
            words = " ".join(section.replace("#", " ").split()).split(" (")[0]  # a reference may wrap a line
            if md is None:
                if target.startswith(ours):  # another project's file (pytorch's RELEASE.md) is not checked
                    broken.append(f"{f.relative_to(ROOT)}: {target} (no such file)")
                continue
            seen += 1
            titles = re.findall(r"^#{1,6} +(.+?) *#*$", FENCE.sub("", md.read_text()), re.M)
            if not any(t.replace("`", "").startswith(words.replace("`", "")) for t in titles):
                broken.append(f'{f.relative_to(ROOT)}: {target}, "{section}" (no such heading)')
    assert seen >= 5, "the pattern found fewer than 5 references: it no longer matches how they are written"
    assert not broken, "references to sections that do not exist:\n" + "\n".join(broken)
