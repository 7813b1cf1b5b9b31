"""Pass specs as text, for the command line and saved recipes.

Entry points: `parse_passes(["awq:bits=4,group_size=128", "smooth:alpha=0.5"]) -> [Pass]` and
`build_pass(name, options) -> Pass`. Names are the pass classes in `llmopt.passes`, case-insensitive
(`awq`, `smoothquant`, `mergelora`, ...); option values are parsed as Python literals where they can be.
"""
import ast

from llmopt.errors import LlmoptError


def available_passes() -> dict:
    import llmopt.passes as passes

    return {name.lower(): getattr(passes, name) for name in passes.__all__}


def build_pass(name: str, options: dict):
    registry = available_passes()
    cls = registry.get(name.lower().replace("_", "").replace("-", ""))
    if cls is None:
        raise LlmoptError(f"unknown pass {name!r}: choose from {', '.join(sorted(registry))}")
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


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
