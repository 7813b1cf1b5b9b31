"""Testing utilities: tiny configs of real architectures (hypothesis strategies) and models built from them.

Entry points: `config_strategy(family)`, `any_config()`, `build_model(config, seed)`,
`input_ids_strategy(vocab)`, `inject_outliers(program)`; `FAMILIES` names the architectures.
"""
from llmopt.testing.configs import FAMILIES, any_config, build_model, config_strategy, input_ids_strategy
from llmopt.testing.outliers import inject_outliers

__all__ = ["FAMILIES", "any_config", "build_model", "config_strategy", "input_ids_strategy", "inject_outliers"]
