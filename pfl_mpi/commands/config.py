"""Print the configuration a run would use: the file and --set overrides resolved and validated (as
``pfl-mpi run`` validates them, data checks included), with every default filled in, as YAML that
``pfl-mpi run`` accepts back. --explain adds each key's description (the schema) as a comment above it.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import typing

from ..errors import ConfigError

NAME = "config"
HELP = "print the resolved, validated configuration with every default (--explain: with descriptions)"
EXIT_CONFIG = 2
WIDTH = 100


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML experiment file (default: the built-in defaults)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override (repeatable)"
    )
    parser.add_argument("--explain", action="store_true", help="each key's description as a comment above it")


def _describe(info) -> str:
    """A field's description, and its choices when it has a fixed set of them."""
    text = (info.description or "").strip()
    args = typing.get_args(info.annotation)
    literal = info.annotation if typing.get_origin(info.annotation) is typing.Literal else None
    literal = literal or next((a for a in args if typing.get_origin(a) is typing.Literal), None)
    choices = [str(v) for v in typing.get_args(literal)] if literal is not None else []
    if choices and not all(choice in text for choice in choices):  # unless the description names them all
        text += f" (one of: {', '.join(choices)})"
    return text.strip()


def _value(name: str, value, pad: str) -> list[str]:
    import yaml

    flow = None if isinstance(value, (list, dict)) else False  # lists of scalars inline, the rest in block style
    text = yaml.safe_dump({name: value}, sort_keys=False, default_flow_style=flow, width=WIDTH).rstrip("\n")
    return [pad + line for line in text.splitlines()]


def explain(model, dumped: dict, indent: int = 0) -> list[str]:
    """``dumped`` (the model's JSON dump) as YAML lines, each field preceded by its description."""
    from pydantic import BaseModel

    pad, lines = " " * indent, []
    for name, info in type(model).model_fields.items():
        description = _describe(info)
        if description:
            lines += textwrap.wrap(description, WIDTH - indent, initial_indent=f"{pad}# ", subsequent_indent=f"{pad}# ")
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            lines.append(f"{pad}{name}:")
            lines += explain(value, dumped[name], indent + 2)
        elif name == "algorithm" and isinstance(value, dict):
            lines += _explain_algorithm(value, dumped[name], indent + 2)
        else:
            lines += _value(name, dumped[name], pad)
    return lines


def _explain_algorithm(section: dict, dumped: dict, indent: int) -> list[str]:
    from ..algorithms import algorithm_names, resolve

    cls, params = resolve(section)
    pad = " " * indent
    choices = ", ".join(algorithm_names())
    lines = [f"{pad[:-2]}algorithm:"]
    lines += textwrap.wrap(
        f"the algorithm (one of: {choices}); the keys below are its own parameters ({cls.__name__}.Params)",
        WIDTH - indent,
        initial_indent=f"{pad}# ",
        subsequent_indent=f"{pad}# ",
    )
    lines += _value("name", dumped["name"], pad)
    params_dump = {k: v for k, v in dumped.items() if k != "name"}
    return lines + explain(params, params_dump, indent)


def run(args: argparse.Namespace, argv: list[str]) -> int:
    from ..config import load_config
    from ..data import load_federated
    from ..runtime.build import check_buildable

    try:
        cfg = load_config(args.config, args.overrides)
        check_buildable(cfg, load_federated(cfg.data, cfg.seed))
    except ConfigError as err:
        print(f"pfl-mpi: config error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    if not args.explain:
        sys.stdout.write(cfg.to_yaml())
        return 0
    header = [
        "# The configuration as `pfl-mpi run` resolves it: every key with its value (defaults filled in) and",
        "# its description. Every key can be set in a YAML file or with --set key.sub=value.",
    ]
    print("\n".join(header + explain(cfg, cfg.model_dump(mode="json"))))
    return 0
