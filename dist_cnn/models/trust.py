"""Which model specs a file may name: loading a file never runs code it names.

A model.pt or checkpoint records the spec its model was built from. Rebuilding that model imports
nothing but dist_cnn and the libraries for built-in architectures, `torchvision:NAME` and `timm:NAME`.
A `package.module:factory` spec would import and call code that the file names (a crafted file could
name `code:interact`, or a module planted in the current folder), so it is built only when the user
asks on the command line: `--model SPEC` naming the same spec, or `--trust-model-code` (the
convention of `trust_remote_code`). Specs naming a model class of dist_cnn's own model modules
(`dist_cnn.models.registry:SeedNet`, recorded by the Python API for dist_cnn's classes; the older
`dist_cnn.models:SeedNet` too) import only dist_cnn and count as built-in.
"""

from __future__ import annotations

import importlib

from torch import nn

from dist_cnn.errors import UserError
from dist_cnn.models.registry import MODELS, MOVED, parse_spec

OWN_MODEL_PACKAGE = "dist_cnn.models"


def _own_model_class(target: str) -> bool:
    """`dist_cnn.models[.sub]:Class` naming an nn.Module subclass of dist_cnn's own model modules, or
    one of its registered builders."""
    module_name, _, attr = target.partition(":")
    module_name = MOVED.get(module_name, module_name)
    if module_name != OWN_MODEL_PACKAGE and not module_name.startswith(OWN_MODEL_PACKAGE + "."):
        return False
    try:  # dist_cnn's own package: importing it runs only dist_cnn's code
        obj = importlib.import_module(module_name)
    except ImportError:
        return False
    for part in attr.split("."):
        obj = getattr(obj, part, None)
    return (isinstance(obj, type) and issubclass(obj, nn.Module)) or any(obj is f for f in MODELS.values())


def needs_trust(spec: str) -> bool:
    """Whether building `spec` imports code outside dist_cnn and the model libraries."""
    s = parse_spec(spec)
    return s.kind == "module" and not _own_model_class(s.name)


def check_file_spec(spec: str, source: str, *, named: str | None = None, trust: bool = False) -> None:
    """Refuse, in one line, to build a model spec read from the file `source` unless it is safe or
    the user allowed it: `named` is the command line's --model (it must be the file's spec), `trust`
    is --trust-model-code."""
    if not isinstance(spec, str) or not spec:
        raise UserError(f"{source} does not say which model it holds")
    try:
        parse_spec(spec)
    except UserError:
        raise UserError(f"{source} names a model this version does not know: {spec[:120]!r}") from None
    if named is not None and named != spec:
        raise UserError(f"--model {named} is not the model {source} was trained with ({spec})")
    if needs_trust(spec) and not trust and named != spec:
        module = spec.partition(":")[0]
        raise UserError(
            f"{source} asks to import module {module!r} to build its model ({spec}); a loaded file never "
            f"runs code by itself: if you trust it, pass --model {spec} (or --trust-model-code)"
        )


def add_trust_arguments(parser) -> None:
    """--model and --trust-model-code for the commands that rebuild a model from a file."""
    parser.add_argument(
        "--model",
        metavar="SPEC",
        help="the model spec the file was trained with; needed (and must match) when it is a "
        "package.module:factory spec, whose module is imported and called (default: built-in, "
        "torchvision: and timm: specs only)",
    )
    parser.add_argument(
        "--trust-model-code",
        action="store_true",
        help="build whatever model spec the file names, importing and calling the module it names "
        "(only for files you trust) (default: False)",
    )
