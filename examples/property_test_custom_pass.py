"""A hypothesis property test of the custom pass in custom_pass.py: on random models of every family
and random inputs, `RemoveMulByOne` keeps the function exactly and leaves no `x * 1.0` behind.

Entry point: `test_remove_mul_by_one_keeps_the_function` (pytest collects it too). Run it as a script:

    python examples/property_test_custom_pass.py --examples 10
"""
import argparse

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import llmopt
from llmopt.testing import any_config, build_model, input_ids_strategy
from llmopt.testing.equivalence import assert_equivalent

from custom_pass import RemoveMulByOne, is_exact_identity, times_one, unchanged

TRIED = []  # model_type of every model the property was checked on


def muls_by_one(program) -> int:
    return len(llmopt.Pattern(times_one, unchanged, extra_check=is_exact_identity).matches(program))


@given(config=any_config(), seed=st.integers(0, 2**16), data=st.data())
def test_remove_mul_by_one_keeps_the_function(config, seed, data):
    TRIED.append(config.model_type)  # for the summary line main() prints
    program = llmopt.capture(build_model(config, seed=seed))
    reference = program.copy()
    expected = muls_by_one(program)

    result = RemoveMulByOne()(program)

    assert result.stats == {"mul_by_one_removed": expected} and result.changed == (expected > 0)
    assert muls_by_one(result.program) == 0
    result.program.verify()
    input_ids = data.draw(input_ids_strategy(config.vocab_size, max_batch=2, max_len=16))  # [B, T]
    # x * 1.0 == x exactly in every float dtype, so the logits must agree bit for bit
    assert_equivalent(result.program, reference, input_ids, rtol=0, atol=0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=10, help="random models to try")
    args = parser.parse_args()
    run = settings(max_examples=args.examples, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    run(test_remove_mul_by_one_keeps_the_function)()
    print(f"RemoveMulByOne kept the function on {len(TRIED)} random models: {', '.join(TRIED)}")


if __name__ == "__main__":
    main()
