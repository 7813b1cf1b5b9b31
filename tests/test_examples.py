"""The documented examples run as scripts and print what the docs say; the docs quote them verbatim."""
import re
import sys
from pathlib import Path

import pytest

from tests.background import Job

ROOT = Path(__file__).resolve().parents[1]


def example(name, *args) -> Job:
    return Job([sys.executable, str(ROOT / "examples" / name), *args], cwd=ROOT, timeout=300)


# each example runs in its own process; these start when the tests are collected (tests/background.py)
BACKGROUND = {
    "test_quickstart": example("quickstart.py"),
    "test_custom_pass": example("custom_pass.py"),
    "test_custom_pass_property_test": example("property_test_custom_pass.py", "--examples", "2"),
}


def run_example(test_name) -> str:
    """The stdout of the example `test_name` checks (its run in BACKGROUND), which must have exited with 0."""
    done = BACKGROUND[test_name].result()
    script = Path(done.args[1]).name
    assert done.returncode == 0, f"{script} exited with {done.returncode}:\n{done.stdout}\n{done.stderr[-4000:]}"
    return done.stdout


def test_quickstart():
    out = run_example("test_quickstart")
    assert "| MergeLoRA |" in out and "lora_merged=4" in out  # q_proj and v_proj of two layers
    assert "| Smooth |" in out and "norms_smoothed=4, linears_smoothed=10" in out
    error = float(re.search(r"max \|logits - eager logits\|: (\S+)", out).group(1))
    assert error < 1e-4  # both passes are exact; fp32
    generated = re.search(r"generated: \[(.*)\]", out).group(1).split(", ")
    assert len(generated) == 5 + 10 and generated[:5] == ["1", "17", "42", "99", "7"]


def test_custom_pass():
    out = run_example("test_custom_pass")
    assert "| RemoveMulByOne |" in out and "mul_by_one_removed=2" in out  # RoPE's cos and sin scaling
    assert "equivalent to the eager model: yes" in out


def test_custom_pass_property_test():
    out = run_example("test_custom_pass_property_test")
    tried = re.search(r"RemoveMulByOne kept the function on (\d+) random models: (.*)", out)
    assert tried and int(tried.group(1)) == 2 and len(tried.group(2).split(", ")) == 2


@pytest.mark.parametrize("example", ["custom_pass.py", "property_test_custom_pass.py"])
def test_docs_quote_the_examples_verbatim(example):
    """Every multi-line Python block of README.md that defines something is code from an example."""
    doc = (ROOT / "README.md").read_text()
    source = (ROOT / "examples" / example).read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", doc, flags=re.S) if re.search(r"^(def|class|@given)", b, flags=re.M)]
    quoted = [b for b in blocks if b.strip().splitlines()[0] in source]
    assert quoted, f"README.md quotes nothing from {example}"
    for block in quoted:
        assert block.strip() in source, f"README.md drifted from examples/{example}:\n{block}"
