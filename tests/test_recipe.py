"""Pass specs as text (`llmopt.recipe`): the command line's and the saved recipes' way to name passes."""
import pytest

from llmopt.errors import LlmoptError
from llmopt.passes import AWQ, Wanda
from llmopt.recipe import build_pass, parse_passes


def test_options_parse_as_literals_and_words():
    awq, wanda = parse_passes(["awq:bits=3,group_size=64,gqa_vo=true,duo_scaling=False,rounding=gptq", "wanda:sparsity=0.5,pattern=2:4"])
    assert isinstance(awq, AWQ) and isinstance(wanda, Wanda)
    assert (awq.bits, awq.group_size, awq.gqa_vo, awq.duo_scaling, awq.rounding) == (3, 64, True, False, "gptq")
    assert wanda.pattern == "2:4" and wanda.sparsity == 0.5
    assert parse_passes(["awq:gqa_vo=FALSE"])[0].gqa_vo is False


@pytest.mark.parametrize("spec, message", [
    ("awq:gqa_vo=yes", "gqa_vo='yes' must be true or false"),
    ("awq:bits=four", "bits='four' must be an integer"),
    ("awq:bits=true", "bits=True must be an integer"),
    ("wanda:sparsity=half", "sparsity='half' must be a number"),
    ("awq:rounding=1", "rounding=1 must be a string"),
    ("awq:bits", "write key=value"),
    ("awq:colour=red", "does not take these options"),
    ("nosuchpass", "unknown pass"),
])
def test_bad_options_are_refused_by_name(spec, message):
    with pytest.raises(LlmoptError, match=message):
        parse_passes([spec])


def test_saved_recipe_options_rebuild_the_pass():
    awq = AWQ(bits=3, gqa_vo=True)
    rebuilt = build_pass("AWQ", {"bits": 3, "gqa_vo": True})
    assert (rebuilt.bits, rebuilt.gqa_vo) == (awq.bits, awq.gqa_vo)
