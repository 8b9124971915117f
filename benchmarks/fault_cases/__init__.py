"""Case definitions of `benchmarks/fault_matrix.py`: one module per kind of fault."""

from fault_cases import caches, checkpoints, configs, datasets, kills, outputs

MODULES = (kills, caches, checkpoints, configs, datasets, outputs)


def all_cases(refs) -> list:
    """Every case of every module, in table order."""
    return [case for module in MODULES for case in module.cases(refs)]
