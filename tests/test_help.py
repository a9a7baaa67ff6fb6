"""`frugallm --help` and every command's --help: each flag says what it does and, when it takes a
value, its default (issue 31: --prompt, --max-new-tokens, --top-k, --top-p, --seed, chat's
--temperature and train's --save-every had no description)."""

import argparse

import pytest

from frugallm.cli import build_parser, main


def _commands(parser: argparse.ArgumentParser, path=()):
    """(path, parser) of the root and every subcommand, depth first."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, path + (name,))


def _undescribed(parser: argparse.ArgumentParser) -> list[str]:
    """The flags (and positional arguments) of one parser without a description, or taking a value
    with no default in their --help text."""
    formatter = parser._get_formatter()
    problems = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        name = "/".join(action.option_strings) or action.dest
        text = formatter._get_help_string(action) if action.help else ""
        if not text.strip():
            problems.append(f"{name}: no description")
        elif action.option_strings and action.nargs != 0 and not action.required and "default" not in text:
            problems.append(f"{name}: does not say its default")
    return problems


COMMANDS = [path for path, _ in _commands(build_parser())]


def test_the_walk_finds_every_command_and_catches_a_bare_flag():
    assert {("train",), ("distill", "generate"), ("chat",), ("generate",), ("serve",), ("quantize",)} <= set(COMMANDS)
    bare = argparse.ArgumentParser()
    bare.add_argument("--seed", type=int)
    bare.add_argument("--top-p", type=float, help="nucleus sampling")
    bare.add_argument("--flag", action="store_true", help="on or off")
    assert _undescribed(bare) == ["--seed: no description", "--top-p: does not say its default"]


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "frugallm")
def test_every_flag_has_a_description_and_its_default(path, capsys):
    parser = dict(_commands(build_parser()))[path]
    assert _undescribed(parser) == []
    with pytest.raises(SystemExit) as exit:
        main([*path, "--help"])
    assert exit.value.code == 0 and "usage: frugallm" in capsys.readouterr().out


def test_the_overview_speaks_to_a_user(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "argument parsing only" not in out and "library call" not in out
    assert "frugallm train" in out and "does not follow instructions" in out


def test_greedy_generate_and_sampling_chat_say_so(capsys):
    for command, says in (("generate", "0 = greedy"), ("chat", "chat samples by default")):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert says in out and ("greedy by default" in out if command == "generate" else "0.8" in out)


def test_pp_help_says_what_the_layout_allows(capsys):
    """parallel/layout.py: pipelines combine with ep, not with dp > 1."""
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "combines with --ep, not yet with --dp > 1" in out and "not with ep/dp" not in out


def test_chat_refuses_a_temperature_that_is_not_a_number(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["chat", "runs/none", "--temperature", "nan"])
    assert exit.value.code == 2 and "must be a finite number >= 0" in capsys.readouterr().err
