"""The commands README.md, docs/ and every shipped config's header print run as printed: each program exists.

A fresh clone has the venv that scripts/setup.sh makes and no activated venv, so a bare
`rlsync` or `torchrun` there is "command not found" (issue 15). Every fenced ```bash block
and every command line of a config's header comment is split into simple commands; each
must start (after `VAR=value` assignments) with a `.venv/bin/` program that exists in the
venv running the tests, a repository script (`bash scripts/setup.sh`), or a shell builtin.
The program a launcher starts (`torchrun --no-python PROG`, `deepspeed --no_python PROG`),
the script `python` runs and every `configs/*.yaml` argument must exist too. After
`source .venv/bin/activate` in a block (or header), bare venv programs are allowed.

Limitations:
1. It checks that every program exists, not that the command succeeds: running the
   commands is the integration and distributed tiers' job.
2. The shell understood is one command per line, `\\` continuations, `&&`, `||`, `;`,
   `|` and `#` comments. The venv is the one running the tests (`sys.prefix`), which is
   the README's `.venv` unless scripts/setup.sh was pointed elsewhere (`RLSYNC_VENV`).
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.prefix) / "bin"
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
BUILTINS = {"cd", "export", "echo", "set", "unset", "source", "."}
SYSTEM = {"bash", "git"}  # ordinary system tools a fresh clone has; never expected in the venv
LAUNCHERS = {"torchrun", "deepspeed", "accelerate"}
SEPARATORS = {"&&", "||", ";", "|", "&"}
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
FENCE = re.compile(r"^```(?:bash|sh|shell)[ \t]*\n(.*?)^```", re.M | re.S)


def tokens(line: str) -> list[str]:
    """`line` as shell words, comments dropped, `&&` / `;` / `|` as words of their own."""
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    return list(lex)


def simple_commands(line: str) -> list[list[str]]:
    """The simple commands of one line, each without its leading `VAR=value` assignments."""
    commands, words = [], []
    for word in [*tokens(line), ";"]:
        if word in SEPARATORS:
            while words and ASSIGNMENT.match(words[0]):
                words.pop(0)
            if words:
                commands.append(words)
            words = []
        else:
            words.append(word)
    return commands


def fenced_commands(path: Path) -> list[tuple[str, list[str]]]:
    """(where, command lines) for each fenced bash block of a Markdown file."""
    text = path.read_text(encoding="utf-8")
    out = []
    for match in FENCE.finditer(text):
        where = f"{path.relative_to(REPO)}:{text.count(chr(10), 0, match.start()) + 1}"
        body = match.group(1).replace("\\\n", " ")
        out.append((where, [line for line in body.splitlines() if line.strip() and not line.lstrip().startswith("#")]))
    return out


def looks_like_command(line: str) -> bool:
    """Whether a header comment line (without its `#`) is a command rather than prose."""
    if not line.strip() or line.strip()[0] in "(-":
        return False
    try:
        commands = simple_commands(line)
    except ValueError:  # prose with an apostrophe ("the engine's share"): an unclosed quote to shlex
        return False
    if not commands:
        return False
    program = commands[0][0]
    return (program.startswith((".venv/", "./", "scripts/")) or program in BUILTINS | SYSTEM
            or program in LAUNCHERS or (VENV_BIN / program).exists())


def header_commands(path: Path) -> list[str]:
    """The command lines of a config's leading comment block."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        if looks_like_command(line[1:]):
            lines.append(line[1:].strip())
    return lines


def launched_program(args: list[str]) -> str | None:
    """The program a launcher starts: the first argument that is a path, a script or a venv program."""
    for arg in args:
        if arg in ("-m", "--module"):
            return None
        if arg.startswith("-"):
            continue
        if "/" in arg or arg.endswith(".py") or (VENV_BIN / arg).exists():
            return arg
    return None


def program_problem(program: str, activated: bool) -> str | None:
    if program.startswith(".venv/bin/"):
        if not (VENV_BIN / program.removeprefix(".venv/bin/")).is_file():
            return f"{program}: no such program in the venv ({VENV_BIN})"
        return None
    if "/" in program:
        return None if (REPO / program).is_file() else f"{program}: no such file in the repository"
    if program in BUILTINS | SYSTEM:
        return None
    if activated and (VENV_BIN / program).is_file():
        return None
    where = "installed in the venv" if (VENV_BIN / program).is_file() else "not in the venv either"
    return (f"`{program}` is not on PATH in a fresh clone ({where}): write .venv/bin/{program}, "
            f"or `source .venv/bin/activate` first")


def command_problems(lines: list[str]) -> list[str]:
    """Every problem of a block of command lines, run in order in one shell."""
    problems, activated = [], False
    for line in lines:
        for words in simple_commands(line):
            program, args = words[0], words[1:]
            name = Path(program).name
            found = []
            if program in ("source", ".", "bash"):
                target = args[0] if args else ""
                if target == ".venv/bin/activate":
                    activated = activated or (VENV_BIN / "activate").is_file()
                    found.append(None if activated else f"{target}: the venv has no activate script")
                else:
                    found.append(None if (REPO / target).is_file() else f"{program} {target}: no such repository file")
            else:
                found.append(program_problem(program, activated))
            if name in LAUNCHERS and (launched := launched_program(args)) is not None:
                found.append(program_problem(launched, activated))
            if name.startswith("python") and args and args[0].endswith(".py"):
                found.append(None if (REPO / args[0]).is_file() else f"{args[0]}: no such script")
            found += [f"{arg}: no such config" for arg in args
                      if re.fullmatch(r"configs/\S+\.yaml", arg) and not (REPO / arg).is_file()]
            problems += [f"{line!r}: {p}" for p in found if p]
    return problems


BLOCKS = [block for doc in DOCS for block in fenced_commands(doc)]


@pytest.mark.parametrize("where, lines", BLOCKS, ids=[where for where, _ in BLOCKS])
def test_readme_commands_start_programs_that_exist(where, lines):
    assert not command_problems(lines), "\n".join(command_problems(lines))


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(REPO)) for p in CONFIGS])
def test_config_header_commands_start_programs_that_exist(path):
    lines = header_commands(path)
    assert lines, f"{path} must open with a comment giving the command that runs it"
    assert not command_problems(lines), "\n".join(command_problems(lines))


def test_the_readme_commands_are_found():
    lines = [line for _, block in BLOCKS for line in block]
    assert "bash scripts/setup.sh && .venv/bin/rlsync run configs/grpo/tiny_cpu_fp8.yaml" in lines
    assert "bash scripts/setup.sh && .venv/bin/python -m pytest" in lines
    assert any("torchrun" in line for line in lines) and any("deepspeed" in line for line in lines)
    assert len(lines) >= 15


@pytest.mark.parametrize("lines, needle", [
    (["torchrun --nproc_per_node 2 --no-python rlsync run configs/grpo/tiny_cpu_fsdp2.yaml"], "`torchrun` is not on PATH"),
    ([".venv/bin/torchrun --nproc_per_node 2 --no-python rlsync run configs/grpo/tiny_cpu_fsdp2.yaml"], "`rlsync`"),
    (["DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --no_python rlsync run configs/grpo/tiny_cpu_zero3.yaml"], "`deepspeed`"),
    ([".venv/bin/rlsync run configs/grpo/no_such_config.yaml"], "no such config"),
    ([".venv/bin/no-such-program --help"], "no such program in the venv"),
    (["bash scripts/no_such_setup.sh && .venv/bin/rlsync ls"], "no such repository file"),
    ([".venv/bin/python benchmarks/no_such_bench.py"], "no such script"),
    (["rlsync ls", "source .venv/bin/activate"], "`rlsync`"),  # activating later does not help
])
def test_the_check_catches_commands_that_fail_as_printed(lines, needle):
    assert any(needle in p for p in command_problems(lines)), command_problems(lines)


def test_an_activated_venv_allows_bare_venv_programs():
    lines = ["source .venv/bin/activate",
             "DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --no_python --no_local_rank rlsync run configs/grpo/tiny_cpu_zero3.yaml"]
    assert command_problems(lines) == []
    assert command_problems([".venv/bin/torchrun --nproc_per_node 2 -m rlsync.cli run configs/grpo/tiny_cpu_fsdp2.yaml"]) == []
