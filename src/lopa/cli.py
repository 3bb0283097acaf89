"""The ``lopa`` command: one verb per function, its options the fields of a dataclass.

Each verb is ``"module:ArgsDataclass"`` plus ``"module:function"``; the module is imported only when
the verb runs (or its ``--help`` is asked for), so ``lopa --help`` is instant. An option's help is the
attribute docstring written under the field, so the ``--help`` text and the Python API say the same.

Example::

    $ lopa train --method lopa --task rotten-tomatoes
    $ lopa eval runs/rotten-tomatoes-lopa --split test
    $ lopa serve --model smollm2-135m --port 8000
    $ lopa gateway --task sentiment=runs/rotten-tomatoes-lopa/best --upstream http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import inspect
import sys
import textwrap
import types
import typing
from typing import Any, Callable, Sequence

from .allocator import retain_freed_memory

# verb -> (args dataclass, function, one-line description)
VERBS: dict[str, tuple[str, str, str]] = {
    "train": ("lopa.train:TrainArgs", "lopa.train:train_cli", "train a soft-prompt method (or a LoRA/full baseline) on a task"),
    "eval": ("lopa.evaluate:EvalArgs", "lopa.evaluate:eval_cli", "evaluate a run or artifact (or the bare model zero-shot) on a task"),
    "export": ("lopa.cli_export:ExportArgs", "lopa.cli_export:export_cli", "export a prompt-tuning artifact to PEFT, or import a PEFT adapter"),
    "serve": ("lopa.serve.server:ServeConfig", "lopa.serve.server:serve", "serve a frozen model; clients send their soft prompts"),
    "gateway": ("lopa.gateway.config:GatewayConfig", "lopa.gateway.server:gateway", "serve trained tasks by name to any OpenAI client, through a lopa serve"),
    "classify": ("lopa.client:ClassifyArgs", "lopa.client:classify_cli", "classify texts with an artifact, in-process or through a server"),
    "generate": ("lopa.client:GenerateArgs", "lopa.client:generate_cli", "generate completions with an artifact, in-process or through a server"),
    "bench": ("lopa.bench:BenchArgs", "lopa.bench:bench_cli", "run a benchmark (accuracy, train-speed, serving)"),
}


def _load(ref: str) -> Any:
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings: the string literal right under each field of a dataclass (and its bases)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for a, b in zip(body, body[1:]):
            if isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr) \
                    and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str):
                docs[a.target.id] = " ".join(b.value.value.split())
    return docs


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(the type argparse should convert to, whether None is allowed)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else str), True
    return tp, False


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--option`` per field (``positional`` metadata makes it positional)."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.metadata.get("cli") is False:
            continue
        tp, optional = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        help_text = docs.get(f.name, "")
        if default not in (None, False, "", []) and not f.metadata.get("positional"):
            help_text += f" (default: {default})"
        name = f.name.replace("_", "-")
        kwargs: dict[str, Any] = {"help": help_text or None}
        choices = f.metadata.get("choices")
        if choices:
            kwargs["choices"] = choices
        if typing.get_origin(tp) is typing.Literal:
            kwargs["choices"] = list(typing.get_args(tp))
            tp = type(kwargs["choices"][0])
        if f.metadata.get("remainder"):
            parser.add_argument(f.name, nargs=argparse.REMAINDER, **kwargs)
        elif f.metadata.get("positional"):
            parser.add_argument(f.name, type=tp, nargs="?" if optional or default is not None else None,
                                default=default, **kwargs)
        elif tp is bool:
            parser.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=default, **kwargs)
        elif typing.get_origin(tp) in (list, tuple):
            inner = (typing.get_args(tp) or (str,))[0]
            # "extend": the option may be repeated (--task a=x --task b=y), each adding to the list
            action = {"action": "extend"} if f.metadata.get("extend") else {}
            parser.add_argument(f"--{name}", type=inner, nargs="+", default=default, dest=f.name, **action, **kwargs)
        else:
            parser.add_argument(f"--{name}", type=tp, default=default, dest=f.name, **kwargs)


def add_method_options(parser: argparse.ArgumentParser, cls: type, argv: Sequence[str]) -> list[str]:
    """For a verb whose args class has ``method_options`` (``lopa train``): the chosen method's own
    options, read from its config dataclass in the method registry, as one argument group. Returns
    their names, which :func:`main` gathers into the ``options`` dict."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method", default=next(f.default for f in dataclasses.fields(cls) if f.name == "method"))
    method = pre.parse_known_args(argv)[0].method
    try:
        opt_cls = cls.method_options(method)
    except ValueError:
        return []  # the main parser reports the unknown method with the list of choices
    group = parser.add_argument_group(f"options of --method {method} (from its config; other methods have their own)")
    add_dataclass_arguments(group, opt_cls)  # type: ignore[arg-type]
    return [f.name for f in dataclasses.fields(opt_cls) if f.init and f.metadata.get("cli") is not False]


def build_parser(verb_names: Sequence[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lopa", description="Low-rank soft prompts: train, evaluate and serve "
                                     "customised tasks on one frozen model.")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name, (args_ref, _, desc) in VERBS.items():
        if verb_names is not None and name not in verb_names:
            sub.add_parser(name, help=desc, add_help=False)
            continue
        cls = _load(args_ref)
        p = sub.add_parser(name, help=desc, description=(inspect.getdoc(cls) or desc),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        add_dataclass_arguments(p, cls)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # before any tensor is made: every verb runs models, and glibc's defaults cost each pass its page faults
    try:
        retain_freed_memory()
    except ValueError as e:  # a bad LOPA_MALLOC: say so before any work
        print(f"lopa: {e}", file=sys.stderr)
        return 2
    verb = next((a for a in argv if not a.startswith("-")), None)
    if verb not in VERBS:
        build_parser(verb_names=[]).parse_args(argv or ["--help"])
        return 2
    parser = build_parser(verb_names=[verb])
    args_ref, fn_ref, _ = VERBS[verb]
    cls, fn = _load(args_ref), _load(fn_ref)
    verb_parser = parser._subparsers._group_actions[0].choices[verb]  # type: ignore[union-attr]
    option_names = add_method_options(verb_parser, cls, argv) if hasattr(cls, "method_options") else []
    ns = vars(parser.parse_args(argv))
    ns.pop("verb")
    if option_names:
        ns["options"] = {name: ns.pop(name) for name in option_names}
    try:
        args = cls(**ns)
    except (ValueError, TypeError) as e:  # the dataclass validated itself
        parser.error(str(e))
    result: Callable[..., Any] = fn(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
