"""``silo completion bash|zsh``: a shell completion script, made from the CLI's own parsers.

Verbs come from :data:`silo.cli.main.COMMANDS`, each verb's options from its argparse
parser (so the script cannot drift from the CLI), workspace names from ``silo ls
--quiet`` when the script runs. zsh loads the same function through ``bashcompinit``.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence

from silo.cli import args, workspaces

# verbs whose NAME arguments are existing workspaces (create and import name new ones)
_NEW_NAME = ("create", "import")
_FILE_OPTIONS = ("-f", "--file", "--env-file", "-v", "--volume", "--root", "--keep", "--seccomp", "--cow")

_BASH = """\
# silo's completion for bash; load it with: source <(silo completion bash)
_silo_workspaces() { silo ls --quiet 2>/dev/null; }
_silo() {
    local cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD-1]} verb=${COMP_WORDS[1]} opts=""
    if [ "$COMP_CWORD" -eq 1 ]; then
        COMPREPLY=($(compgen -W "@VERBS@" -- "$cur"))
        return
    fi
    case "$verb" in
@OPTIONS@
    esac
    if [[ $cur == -* ]]; then
        COMPREPLY=($(compgen -W "$opts" -- "$cur"))
        return
    fi
    case "$prev" in
        --from) COMPREPLY=($(compgen -W "$(_silo_workspaces)" -- "$cur")); return ;;
        @FILE_OPTIONS@) COMPREPLY=($(compgen -f -- "$cur")); return ;;
    esac
    case "$verb" in
        @NAME_VERBS@) COMPREPLY=($(compgen -W "$(_silo_workspaces)" -- "$cur")) ;;
        template) [ "$COMP_CWORD" -eq 2 ] && COMPREPLY=($(compgen -W "@TEMPLATE@" -- "$cur")) ;;
        server) COMPREPLY=($(compgen -W "stop status" -- "$cur")) ;;
        completion) COMPREPLY=($(compgen -W "bash zsh" -- "$cur")) ;;
        *) COMPREPLY=($(compgen -f -- "$cur")) ;;
    esac
}
complete -o default -F _silo silo
"""

_ZSH_HEAD = """\
#compdef silo
# silo's completion for zsh; load it with: source <(silo completion zsh)
autoload -U +X bashcompinit && bashcompinit
"""


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def options(parser: argparse.ArgumentParser) -> list[str]:
    """Every option string of ``parser`` and of its subcommands, in order, once."""
    found = [opt for action in parser._actions for opt in action.option_strings]
    for sub in _subparsers(parser).values():
        found += options(sub)
    return list(dict.fromkeys(found))


def _takes_workspaces(verb: str, parser: argparse.ArgumentParser) -> bool:
    return verb not in _NEW_NAME and any(a.dest in ("name", "names") and not a.option_strings
                                         for a in parser._actions)


def _words(items: Iterable[str]) -> str:
    return " ".join(items)


def script(shell: str, verbs: Sequence[str]) -> str:
    """The completion script for ``shell`` (bash or zsh) over the CLI's ``verbs``."""
    parsers: dict[str, argparse.ArgumentParser] = {verb: parse() for verb, (parse, _) in workspaces.VERBS.items()}
    parsers["run"] = parsers["plan"] = args.run_parser()
    cases = [f'        {verb}) opts="{_words(options(parser))}" ;;' for verb, parser in sorted(parsers.items())]
    names = [verb for verb, parser in sorted(parsers.items()) if _takes_workspaces(verb, parser)]
    text = (_BASH.replace("@VERBS@", _words([*verbs, "version"]))
            .replace("@OPTIONS@", "\n".join(cases))
            .replace("@FILE_OPTIONS@", "|".join(_FILE_OPTIONS))
            .replace("@NAME_VERBS@", "|".join(names))
            .replace("@TEMPLATE@", _words(_subparsers(parsers["template"]))))
    return _ZSH_HEAD + text if shell == "zsh" else text
