"""Pass specs as text, for the command line and saved recipes.

Entry points: `parse_passes(["awq:bits=4,group_size=128", "smooth:alpha=0.5"]) -> [Pass]` and
`build_pass(name, options) -> Pass`. Names are the pass classes in `llmopt.passes`, case-insensitive
(`awq`, `smoothquant`, `mergelora`, ...); option values are parsed as Python literals where they can be,
`true`/`false`/`none` in any case too, and checked against the types the pass's constructor declares.
"""
import ast
import inspect

from llmopt.errors import LlmoptError


def available_passes() -> dict:
    import llmopt.passes as passes

    return {name.lower(): getattr(passes, name) for name in passes.__all__}


def build_pass(name: str, options: dict):
    registry = available_passes()
    cls = registry.get(name.lower().replace("_", "").replace("-", ""))
    if cls is None:
        raise LlmoptError(f"unknown pass {name!r}: choose from {', '.join(sorted(registry))}")
    _check_types(cls, options)
    try:
        return cls(**options)
    except TypeError as err:
        raise LlmoptError(f"pass {name!r} does not take these options {options}: {err}") from err


def parse_passes(specs) -> list:
    """["name:key=value,key=value", ...] -> [Pass]."""
    built = []
    for spec in specs:
        name, _, rest = spec.partition(":")
        options = {}
        for item in filter(None, rest.split(",")):
            key, eq, value = item.partition("=")
            if not eq:
                raise LlmoptError(f"bad pass option {item!r} in {spec!r}: write key=value, e.g. awq:bits=4,group_size=128")
            options[key.strip()] = _literal(value.strip())
        built.append(build_pass(name.strip(), options))
    return built


def _check_types(cls, options: dict):
    """A value whose type does not match a bool/int/float/str annotation of the constructor is refused
    (a bool option given "yes" would otherwise be silently true)."""
    parameters = inspect.signature(cls).parameters
    for key, value in options.items():
        expected = parameters[key].annotation if key in parameters else inspect.Parameter.empty
        if expected is bool:
            ok = isinstance(value, bool)
        elif expected is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif expected is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif expected is str:
            ok = isinstance(value, str)
        else:
            continue
        if not ok:
            hint = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[expected]
            raise LlmoptError(f"pass {cls.__name__}: option {key}={value!r} must be {hint}")


_WORDS = {"true": True, "false": False, "none": None, "null": None}


def _literal(text: str):
    if text.lower() in _WORDS:
        return _WORDS[text.lower()]
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
