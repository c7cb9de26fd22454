"""autoshard: annotate a few tensors, get a correct many-device JAX program and a report.

>>> import autoshard as ash
>>> from jax.sharding import PartitionSpec as P
>>> mesh = ash.make_mesh("data=2,model=4")                                  # doctest: +SKIP
>>> step = ash.parallelize(train_step, mesh=mesh, in_specs=(params_specs, None, P("data")))  # doctest: +SKIP
"""
from .compiler.hardware import HardwareModel, hardware_for
from .compiler.mesh import abstract_mesh, make_mesh
from .compiler.ops.constraint import constrain
from .compiler.ops.custom import register_rule, with_rule
from .errors import (MeshError, NoFeasiblePlanError, PlanningOnlyError, ShardingError, ShardingRuleError,
                     SpecError, UnsupportedPrimitiveError, UnsupportedPrimitiveWarning)
from .report import ShardingReport
from .runtime.calibrate import Calibration, calibrate
from .runtime.executable import ParallelFunction, parallelize

__all__ = [
    "make_mesh", "abstract_mesh", "parallelize", "constrain", "ParallelFunction",
    "ShardingReport", "ShardingError", "MeshError", "SpecError", "UnsupportedPrimitiveError",
    "PlanningOnlyError", "NoFeasiblePlanError", "UnsupportedPrimitiveWarning",
    "register_rule", "with_rule", "ShardingRuleError",
    "calibrate", "Calibration", "hardware_for", "HardwareModel",
]
