"""Reading a spec is bounded whatever the file holds (components/yamlread.py): an alias bomb and a 50 MB file are
refused in one line, fast and in little memory; a repeated key, deep nesting and broken YAML are one-line errors
naming the file, the line and the column; an error never prints a pasted value back whole."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from components.config import ConfigError, load_config
from pipelines.cli import main as posttrain
from pipelines.spec import SPECS_DIR, SpecError, load_spec

ROOT = Path(__file__).resolve().parents[2]
DEMO = (SPECS_DIR / "demo.yaml").read_text()


def alias_bomb() -> str:
    """"Billion laughs" (under 0.5 kB): 9 levels of 9 aliases of the level below, 9**9 strings once expanded, where a
    string is expected (an error would quote the value)."""
    lines = ["name: bomb", "description:", '  - &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for below, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"  - &{name} [{', '.join([f'*{below}'] * 9)}]")
    return "\n".join(lines) + "\n"


MEASURE = """
import json, os, resource, subprocess, sys
resource.setrlimit(resource.RLIMIT_CPU, (20, 20))
resource.setrlimit(resource.RLIMIT_AS, (3 << 29, 3 << 29))
with open(sys.argv[1], "wb") as err:
    proc = subprocess.Popen(sys.argv[2:], stdout=subprocess.DEVNULL, stderr=err)
    _, status, usage = os.wait4(proc.pid, 0)
print(json.dumps([os.waitstatus_to_exitcode(status), usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024]))
"""
"""Runs argv from a small process (a child's peak RSS counts the memory of the process it was forked from) with
at most 20 s of CPU and 1.5 GiB of address space, so that an unbounded reader fails the test instead of eating
the machine; prints [exit status, CPU seconds, peak RSS in MB] of that one child (wait4)."""


def run_measured(tmp_path, argv: list[str]) -> tuple[int, list[str], float, float]:
    """(exit status, stderr lines, CPU seconds, peak RSS in MB) of argv: CPU, not wall, seconds, which other
    processes sharing the cores (a parallel test run) do not lengthen."""
    err = tmp_path / "stderr.txt"
    out = subprocess.run([sys.executable, "-c", MEASURE, str(err), *argv], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}, check=True)
    code, cpu, rss_mb = json.loads(out.stdout)
    with open(err, "rb") as f:
        head = f.read(1 << 20).decode(errors="replace")
    return code, head.splitlines(), cpu, rss_mb


def fifty_mb_spec(path: Path) -> None:
    """The demo spec with 50 MB of description: YAML that would parse, and a spec that would otherwise validate."""
    head, rest = DEMO.split("description:", 1)
    rest = rest.split("\n", 1)[1]
    with open(path, "w") as f:
        f.write(head + "description: >\n")
        line = "  " + "x" * 98 + "\n"
        for _ in range(50 * (1 << 20) // len(line)):
            f.write(line)
        f.write(rest)


COMMANDS = {"check": ([sys.executable, "-m", "pipelines.spec", "check"], 1),
            "posttrain": ([sys.executable, "-m", "pipelines.cli", "compile"], 2)}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("hostile", ["alias-bomb", "50mb"])
def test_an_alias_bomb_and_a_50_mb_spec_are_refused_in_one_line_in_2_s_and_200_mb(tmp_path, hostile, command):
    spec = tmp_path / f"{hostile}.yaml"
    if hostile == "alias-bomb":
        spec.write_text(alias_bomb())
        assert len(spec.read_bytes()) < 1600
    else:
        fifty_mb_spec(spec)
        assert spec.stat().st_size > 50_000_000
    argv, expected = COMMANDS[command]
    argv = [*argv, str(spec)] + (["-o", str(tmp_path / "out.yaml")] if command == "posttrain" else [])
    code, lines, cpu, rss_mb = run_measured(tmp_path, argv)
    assert code == expected and len(lines) == 1 and len(lines[0]) < 400, (code, len(lines), lines[:1])
    assert str(spec) in lines[0]
    assert ("alias" in lines[0]) if hostile == "alias-bomb" else (f"{spec.stat().st_size} bytes" in lines[0])
    assert cpu < 2.0, f"{cpu:.1f} s of CPU"
    assert rss_mb < 200, f"{rss_mb:.0f} MB"
    assert not (tmp_path / "out.yaml").exists()


def test_a_repeated_key_is_refused_naming_the_key_and_both_lines(tmp_path):
    spec = tmp_path / "dup.yaml"
    spec.write_text(DEMO.replace("base_model: bundled:tiny\n", "base_model: bundled:tiny\nname: other-name\n"))
    second = spec.read_text().splitlines().index("name: other-name") + 1
    first = DEMO.splitlines().index("name: posttrain-demo") + 1
    with pytest.raises(SpecError) as e:
        load_spec(spec)
    assert str(e.value) == (f"{spec}: line {second}, column 1: duplicate key 'name' (first at line {first}): a key "
                            "may appear once in a mapping")

    @dataclass
    class Train:
        lr: float = 0.1
        max_steps: int = 1

    @dataclass
    class Config:
        train: Train

    cfg = tmp_path / "stage.yaml"
    cfg.write_text("train:\n  lr: 0.5\n  max_steps: 3\n  lr: 0.001\n")
    with pytest.raises(ConfigError, match=r"stage\.yaml: line 4, column 3: duplicate key 'lr' \(first at line 2\)"):
        load_config(Config, cfg)


DEEP = {"flow-list": "name: " + "[" * 5000 + "]" * 5000 + "\n",
        "flow-mapping": "name: " + "{a: " * 5000 + "1" + "}" * 5000 + "\n",
        "block": "".join(" " * i + f"k{i}:\n" for i in range(200))}


@pytest.mark.parametrize("shape", sorted(DEEP))
def test_deep_nesting_is_one_line_not_a_traceback(tmp_path, shape):
    spec = tmp_path / "deep.yaml"
    spec.write_text(DEEP[shape])
    out = subprocess.run([sys.executable, "-m", "pipelines.spec", "check", str(spec)], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = out.stderr.splitlines()
    assert out.returncode == 1 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert lines[0].startswith(f"{spec}: line ") and "nest" in lines[0], lines[0]


BROKEN = {  # text, the line and column of the error, a word of its message
    "unclosed-list": ("name: demo\nstages: [a, b\nbase_model: x\n", "line 3, column 11", "expected ',' or ']'"),
    "tab-indent": ("name: demo\nstages:\n\t- stage: sft\n", "line 3, column 1", "cannot start any token"),
    "two-colons": ("name: demo\nbase_model: a: b\n", "line 2, column 14", "mapping values are not allowed"),
    "bad-indent": ("name: demo\n  base_model: x\n", "line 2, column 13", "mapping values are not allowed"),
    "control-char": ("name: demo\nbase_model: \x07x\n", "line 2, column 13", "#x0007"),
    "two-documents": ("name: demo\n---\nname: b\n", "line 2, column 1", "single document"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_yaml_syntax_error_is_one_line_naming_the_file_line_and_column(tmp_path, case, capsys):
    text, at, words = BROKEN[case]
    spec = tmp_path / "broken.yaml"
    spec.write_text(text)
    with pytest.raises(SpecError) as e:
        load_spec(spec)
    message = str(e.value)
    assert message.startswith(f"{spec}: {at}: ") and words in message, message
    assert "\n" not in message and "<unicode string>" not in message

    assert posttrain(["compile", str(spec), "-o", str(tmp_path / "p.yaml")]) == 2  # exit 2, the message alone
    assert capsys.readouterr().err == f"posttrain compile: {message}\n"


def test_a_pasted_value_is_not_printed_back_whole(tmp_path):
    spec = tmp_path / "long.yaml"
    spec.write_text(DEMO.replace("name: posttrain-demo", "name: " + "Q" * 300_000))
    with pytest.raises(SpecError) as e:
        load_spec(spec)
    message = str(e.value)
    assert message.startswith(f"{spec}: name: 'QQQ") and "is invalid" in message
    assert len(message) <= 1000 and "characters cut" in message and "\n" not in message


@pytest.fixture(params=["libyaml", "python"])
def yamlread(request, monkeypatch):
    """components.yamlread with libyaml's loader and with the pure-Python one: the same results and refusals."""
    from components import yamlread as module

    if request.param == "libyaml" and not hasattr(yaml, "CSafeLoader"):
        pytest.skip("PyYAML built without libyaml")
    base = yaml.CSafeLoader if request.param == "libyaml" else yaml.SafeLoader
    checked, loading = module.loaders(base)
    monkeypatch.setattr(module, "_BASE_LOADER", checked)
    monkeypatch.setattr(module, "_Loader", loading)
    return module


def test_every_bundled_spec_reads_as_yaml_safe_load_reads_it(yamlread):
    for path in sorted(SPECS_DIR.glob("*.yaml")):
        assert yamlread.read_yaml(path) == yaml.safe_load(path.read_text()), path


def test_aliases_are_bounded_not_banned(yamlread):
    text = "base: &r {cpu: '1', memory: 1Gi}\nsteps: [*r, *r]\nmerged: {<<: *r, cpu: '2'}\n"
    assert yamlread.parse_yaml(text) == {"base": {"cpu": "1", "memory": "1Gi"},
                                         "steps": [{"cpu": "1", "memory": "1Gi"}] * 2,
                                         "merged": {"cpu": "2", "memory": "1Gi"}}
    refusals = {alias_bomb(): "line 9, column 9: more than 4194304 nodes and characters once aliases are expanded",
                "a: &x [1, *x]\n": "line 1, column 11: alias *x inside the node &x it names: a cycle",
                "a: &x [[[[[[1]]]]]]\nb: " + "[" * 60 + "*x" + "]" * 60: "line 2, column 64: alias *x nests more",
                "a: 1\nb: 1\na: 2\n": "line 3, column 1: duplicate key 'a' (first at line 1)",
                "k: " + "[" * 65 + "]" * 65: "line 1, column 67: nested more than 64 levels deep"}
    for text, expected in refusals.items():
        with pytest.raises(ValueError) as e:
            yamlread.parse_yaml(text, "f.yaml")
        assert str(e.value).startswith(f"f.yaml: {expected}"), str(e.value)


def test_a_file_over_the_size_limit_is_refused_before_it_is_read_whole(tmp_path, yamlread):
    at_limit = tmp_path / "at.yaml"
    at_limit.write_text("a: " + "x" * (yamlread.MAX_BYTES - 4) + "\n")
    assert len(yamlread.read_yaml(at_limit)["a"]) == yamlread.MAX_BYTES - 4
    over = tmp_path / "over.yaml"
    over.write_text("a: " + "x" * (yamlread.MAX_BYTES - 3) + "\n")
    with pytest.raises(ValueError, match=rf"over\.yaml: {yamlread.MAX_BYTES + 1} bytes; .* at most"):
        yamlread.read_yaml(over)
    with pytest.raises(ValueError, match=r"line 2: not UTF-8 text \(byte 8"):
        yamlread.parse_yaml(b"a: 1\nb: \xff\n")
