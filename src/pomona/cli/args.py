"""The command line's machinery: flags made from the settings dataclasses of `pomona.config` (one per field, the
field docstring its --help text, a `Literal[...]` type its choices, `ge`/`le`/... metadata its bounds, nested
dataclasses the --help sections), the parser built from a table of subcommands (`Command`), --help and
--help-all, usage errors in one line with a did-you-mean, and `parse`: defaults (or the command's base config) <-
config file <- flags. The table itself and the subcommands are `pomona.cli`'s.

Standard library, `pomona.config` and `pomona.core.errors` only: everything here runs before a command is known to be
real, so `pomona --help` and usage errors answer at once, without PyTorch.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import re
import sys
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, NoReturn

from ..config import Config, choices, field_docs, load_overrides, merge, out_of_range, range_problems, set_field
from ..core.errors import PomonaError, explain_error

@dataclass(frozen=True)
class Command:
    """A subcommand: its function, the dataclass of its settings, (for commands with a run `Config`) the
    config that a config file and the flags apply to, and whether its --help lists only the basic settings (fields
    with `metadata={"basic": True}` of its own dataclass and of the run's Config; --help-all lists them all)."""

    function: Callable[[Any], int]
    settings: type
    base: Callable[[Any], Config] | None = None
    brief_help: bool = False



# ------------------------------------------------------------------------------------ flags from dataclasses
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _optional(kind: type) -> Callable[[str], Any]:
    def parse(text: str):
        return None if text.lower() in ("none", "null", "") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _bool_or_list(hint: Any) -> tuple[str, ...]:
    """The choices of a `bool | list[Literal[...]]` setting (train.tta), else ()."""
    args = typing.get_args(hint)
    lists = [a for a in args if typing.get_origin(a) is list and typing.get_args(a)]
    return tuple(choices(typing.get_args(lists[0])[0]) or ()) if bool in args and lists else ()


def _choice_list(items: tuple[str, ...]) -> Callable[[str], list[str]]:
    """A comma-separated list of `items`; anything else is a usage error naming them."""
    def parse(text: str) -> list[str]:
        values = _comma_list(text)
        unknown = [v for v in values if v not in items]
        if unknown or not values:
            what = f"unknown {', '.join(map(repr, unknown))}" if unknown else "an empty list"
            raise argparse.ArgumentTypeError(f"{what}: give a comma-separated list of {', '.join(items)}")
        return values

    return parse


def _help(doc: str, f: dataclasses.Field) -> str:
    """The field's docstring and its default, unless the docstring says it or there is none to say."""
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        value = ",".join(map(str, value)) if isinstance(value, list) else value
    else:
        value = None
    shown = doc if value is None or "default" in doc.lower() else f"{doc} (default: {value})"
    return shown.replace("%", "%%")


_field_docs = functools.cache(field_docs)  # reading the source is most of building the parser

SECTION_TITLES = {"train": "training"}
"""Titles of --help sections that differ from the name of their settings section."""


def _section(parser: argparse.ArgumentParser, name: str, cls: type | None = None):
    """The --help group of the settings section `name` (created on first use, described by its dataclass)."""
    groups = parser.__dict__.setdefault("pomona_groups", {})
    if name not in groups:
        groups[name] = parser.add_argument_group(SECTION_TITLES.get(name, name),
                                                 (cls.__doc__ or "").strip().split("\n\n")[0] if cls else None)
    return groups[name]


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, prefix: str = "", skip=(), brief: bool = False,
                        in_config: bool = False) -> None:
    """One flag per field of `cls` (dest `prefix + name`), a group per nested dataclass (dest `prefix.name.`), or
    the group a field's `group` metadata names; flags given on the command line are the only ones present in the
    parsed namespace. With `brief` (a command's --help), fields of `cls` itself (prefix '') and of the run's
    Config (`in_config`) that are not marked basic are accepted but not listed."""
    docs, hints = _field_docs(cls), typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):  # the sections' groups first, so that --help lists them in field order
        if dataclasses.is_dataclass(hints[f.name]) and f.name not in skip:
            _section(parser, f.name, hints[f.name])
    name = prefix.rstrip(".").split(".")[-1]
    group = _section(parser, name, cls) if prefix else parser
    nested, elsewhere = [], []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if f.name in skip:
            continue
        if dataclasses.is_dataclass(hint):
            nested.append((hint, f"{prefix}{f.name}.", f.metadata.get("skip", ())))
            continue
        if f.metadata.get("group", name) != name:
            elsewhere.append(f)
            continue
        _add_flag(group, f, hints[f.name], docs, prefix, brief and (in_config or not prefix))
    for hint, sub_prefix, sub_skip in nested:
        add_dataclass_flags(parser, hint, sub_prefix, sub_skip, brief, in_config or hint is Config)
    for f in elsewhere:  # after the sections: e.g. the run folder's flags come last, seed and device with training
        _add_flag(_section(parser, f.metadata["group"]), f, hints[f.name], docs, prefix,
                  brief and (in_config or not prefix))


def _add_flag(group, f: dataclasses.Field, hint: Any, docs: dict[str, str], prefix: str, brief: bool) -> None:
    """The flag (or positional argument) of one field; with `brief`, a field not marked basic is not listed."""
    required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    help_text = _help(docs.get(f.name, ""), f)
    if brief and not (f.metadata.get("basic") or f.metadata.get("positional") or required):
        help_text = argparse.SUPPRESS
    args = typing.get_args(hint)
    optional = isinstance(hint, types.UnionType) and type(None) in args
    kind = next(a for a in args if a is not type(None)) if optional else hint
    allowed = choices(hint)
    if f.metadata.get("positional"):
        many = typing.get_origin(kind) is list
        extra = {"nargs": "*", "default": [], "metavar": f.name.upper()} if many else {}
        group.add_argument(f.name, help=help_text, choices=[c for c in allowed if c is not None] if allowed
                           else None, **extra)
        return
    options: dict[str, Any] = {"dest": prefix + f.name}
    if required:
        options["required"] = True
    else:
        options["default"] = argparse.SUPPRESS
    listed = _bool_or_list(kind)
    if listed:  # e.g. --tta, --no-tta or --tta identity,hflip,vflip
        options.update(nargs="?", const=True, type=_choice_list(listed), metavar="A,B,...")
        group.add_argument("--no-" + _flag(f.metadata.get("flag", f.name))[2:], dest=prefix + f.name,
                           action="store_const", const=False, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    elif kind is bool:
        options["action"] = argparse.BooleanOptionalAction
    elif allowed:
        options.update(choices=[c for c in allowed if c is not None],
                       type=type(next(c for c in allowed if c is not None)))
    elif typing.get_origin(kind) is list:
        options.update(type=_comma_list, metavar="A,B,...")
    else:
        options.update(type=_optional(kind) if optional else kind,
                       metavar=f.metadata.get("metavar", kind.__name__.upper()))
    short = [f"-{f.metadata['short']}"] if "short" in f.metadata else []  # e.g. -n for --n
    group.add_argument(*short, _flag(f.metadata.get("flag", f.name)), help=help_text, **options)
    for alias in f.metadata.get("aliases", []):  # accepted, not listed (e.g. the US spelling of colour)
        group.add_argument(_flag(alias), help=argparse.SUPPRESS, **options)


def _has_config(cls: type) -> bool:
    return any(f.name == "config" for f in dataclasses.fields(cls))


DEBUG_HELP = "show the full traceback of an error instead of its one-line message"


class Parser(argparse.ArgumentParser):
    """argparse that takes no abbreviated flags (`--epoch 1` is not `--epochs 1`) and answers a usage error with
    the relevant usage line and one line saying what is wrong (with a suggestion for a near miss), not the whole
    usage of a command with 80 settings. `commands` maps each subcommand ('data fetch') to its parser."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)
        self.commands: dict[str, argparse.ArgumentParser] = {}

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"usage: {self.usage_line(message)}\n{self.prog}: error: {_did_you_mean(message)}\n")

    def usage_line(self, message: str = "") -> str:
        """`PROG [options]`, the positional and required arguments, and the argument `message` is about."""
        named = re.match(r"argument (\S+): ", message)
        formatter = self._get_formatter()
        parts = []
        for action in self._actions:
            name = "/".join(action.option_strings) or action.metavar or action.dest
            if action.option_strings and not action.required and not (named and named.group(1) == name):
                continue
            if not action.option_strings:
                parts.append(formatter._format_args(action, formatter._get_default_metavar_for_positional(action)))
                continue
            text = action.option_strings[0]
            if action.nargs != 0:
                text += " " + formatter._format_args(action, formatter._get_default_metavar_for_optional(action))
            parts.append(text if action.required else f"[{text}]")
        return " ".join([self.prog, "[options]", *parts])

    def unknown(self, extras: list[str]) -> NoReturn:
        """Arguments no flag or positional took: the first unknown flag and the nearest real one."""
        flag = next((a.split("=", 1)[0] for a in extras if a.startswith("-") and len(a) > 1), None)
        if flag is None:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        known = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
        near = difflib.get_close_matches(flag, known, n=1)
        self.error(f"unknown flag {flag}" + (f": did you mean {near[0]}?" if near else
                                              f" (`{self.prog} --help` lists the flags)"))


def _did_you_mean(message: str) -> str:
    """argparse's message, with the nearest choice added to an invalid one."""
    bad = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
    if bad:
        near = difflib.get_close_matches(bad.group(1), re.findall(r"'([^']*)'", bad.group(2)), n=1)
        if near:
            return f"{message}: did you mean '{near[0]}'?"
    return message


class HelpAll(argparse.Action):
    """--help-all: the command's help listing every setting (its --help lists the basic ones)."""

    def __init__(self, option_strings: list[str], dest: str, command: str = "",
                 full_parser: Callable[[], Parser] | None = None, **kwargs: Any) -> None:
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0, **kwargs)
        self.command, self.full_parser = command, full_parser

    def __call__(self, parser, namespace, values, option_string=None) -> NoReturn:
        self.full_parser().commands[self.command].print_help()
        parser.exit()


def parse_line(parser: Parser, argv: list[str] | None) -> argparse.Namespace:
    """`parser.parse_args`, with an unknown flag reported by the subcommand's parser (and the nearest real flag)."""
    ns, extras = parser.parse_known_args(argv)
    if extras:
        parser.commands.get(command_name(ns), parser).unknown(extras)
    return ns


def command_name(ns: argparse.Namespace) -> str:
    """The subcommand of a parsed line, as the table of commands names it ('train', 'data fetch')."""
    return (getattr(ns, "command", None) or "") + (f" {ns.subcommand}" if getattr(ns, "subcommand", None) else "")


def build_parser(commands: dict[str, Command], version: str, brief: bool = True) -> Parser:
    """The `pomona` parser of the subcommands `commands` (`pomona.cli.COMMANDS`); with `brief`, the --help of a
    command with `brief_help` lists its basic settings only (--help-all builds it again without `brief`)."""
    parser = Parser(prog="pomona", description="Train, tune, evaluate and serve EfficientNet "
                    "classifiers for apple varieties. `pomona COMMAND --help` lists its settings.")
    parser.add_argument("--version", action="version", version=f"pomona {version}")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, command in commands.items():
        full = name
        doc = (command.settings.__doc__ or "").strip()
        first = " ".join(doc.split("\n\n")[0].split()).split(". ")[0].rstrip(".")
        where = sub
        if " " in name:  # "data fetch": a group of subcommands
            group, name = name.split(" ", 1)
            if group not in groups:
                groups[group] = sub.add_parser(group, help="demo data sets").add_subparsers(
                    dest="subcommand", required=True, metavar="COMMAND")
            where = groups[group]
        short = brief and command.brief_help
        p = where.add_parser(name, help=first, description=" ".join(doc.split()), epilog=(
            f"Only the basic settings are listed: `pomona {full} --help-all` lists every one." if short else None))
        parser.commands[full] = p
        if command.brief_help:
            p.add_argument("--help-all", action=HelpAll, command=full, help="show the help with every setting and exit",
                           full_parser=functools.partial(build_parser, commands, version, brief=False))
        if _has_config(command.settings):
            p.add_argument("--config", metavar="FILE", help="YAML or JSON file with the settings to change "
                           "(only those; see configs/); flags given here override it")
            p.add_argument("--print-config", nargs="?", const="yaml", choices=["yaml", "json"], metavar="yaml|json",
                           help="print the resolved settings (default format: yaml) and exit, touching nothing")
        add_dataclass_flags(p, command.settings, brief=short)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
        for section in p._action_groups:  # a section whose flags are all unlisted is left out of --help
            if all(a.help is argparse.SUPPRESS for a in section._group_actions):
                section.description = None
    return parser


# ------------------------------------------------------------------------------------ settings from the flags
@dataclass
class Invocation:
    """A parsed command line: the subcommand, its settings, and --print-config."""

    name: str
    command: Command
    settings: Any
    print_config: str | None = None
    debug: bool = False


def _set_flags(obj: Any, values: dict[str, Any], prefix: str) -> None:
    """Apply the flags given (dests `prefix + name`) to a settings dataclass and its nested ones."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        if dataclasses.is_dataclass(hints[f.name]):
            _set_flags(getattr(obj, f.name), values, f"{prefix}{f.name}.")
        elif prefix + f.name in values:
            set_field(obj, f.name, values[prefix + f.name], prefix)


def parse(parser: Parser, commands: dict[str, Command], argv: list[str] | None = None) -> Invocation:
    """Parse a command line (with `parser`, the `build_parser` of `commands`) into the settings of its subcommand:
    defaults (or the command's base config) <- config file <- flags. Help, --version and usage errors exit here
    (status 0, 0 and 2) while argparse reads the line, before anything heavy is imported; a bad value in a config
    file is a usage error too."""
    ns = parse_line(parser, argv)
    values = vars(ns)
    name = command_name(ns)
    command = commands[name]
    usage = parser.commands[name]
    cls = command.settings
    top = {f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values}
    try:
        settings = cls(**top)
        if _has_config(cls):
            overrides = load_overrides(ns.config) if ns.config else {}
            hints = typing.get_type_hints(cls)
            sections = {f.name for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])} - {"config"}
            for section in sections & set(overrides):  # e.g. a `tune:` section for `pomona tune`
                for key, value in overrides.pop(section).items():
                    set_field(getattr(settings, section), key, value, f"{section}.")
            base = command.base(settings) if command.base else Config()
            settings.config = merge(base, overrides)
        _set_flags(settings, {k: v for k, v in values.items() if "." in k}, "")
    except (KeyError, ValueError, OSError) as e:
        usage.error(str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e))
    except (ImportError, PomonaError) as e:  # e.g. --from-study without optuna: one line, as execute() reports
        if getattr(ns, "debug", False):
            raise
        print(f"pomona {name}: error: {explain_error(e)[0]}", file=sys.stderr)
        sys.exit(2)
    for dotted, f, why in range_problems(settings)[:1]:  # every number within its bounds, before anything is read
        where = _flag(f.metadata.get("flag", f.name)) if dotted in values else \
            dotted.removeprefix("config.") + (f" (in {ns.config})" if getattr(ns, "config", None) else "")
        _refuse(name, f"{where} {why}")
    return Invocation(name, command, settings, getattr(ns, "print_config", None), bool(getattr(ns, "debug", False)))


def _refuse(name: str, message: str) -> NoReturn:
    print(f"pomona {name}: error: {message}", file=sys.stderr)
    sys.exit(2)


def check_number_flags(ns: argparse.Namespace, commands: dict[str, Command]) -> None:
    """Refuse a number flag outside its bounds as `parse` does, from the command line alone (what `main` checks
    before the re-exec; `parse` checks config files and base configs too)."""
    name = command_name(ns)
    values = vars(ns)

    def check(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                check(hints[f.name], f"{prefix}{f.name}.")
            elif prefix + f.name in values and (why := out_of_range(values[prefix + f.name], f.metadata)):
                _refuse(name, f"{_flag(f.metadata.get('flag', f.name))} {why}, not {values[prefix + f.name]!r}")

    check(commands[name].settings, "")


def format_config(settings: Any, fmt: str = "yaml") -> str:
    """The resolved settings of a command with a config: the Config (as config.json holds it), plus the other
    sections that a config file may hold (e.g. `tune`)."""
    data = settings.config.to_dict()
    for f in dataclasses.fields(settings):
        if f.name != "config" and dataclasses.is_dataclass(getattr(settings, f.name)):
            data[f.name] = dataclasses.asdict(getattr(settings, f.name))
    if fmt == "json":
        import json

        return json.dumps(data, indent=2)
    import yaml

    return yaml.safe_dump(data, sort_keys=False).rstrip()
