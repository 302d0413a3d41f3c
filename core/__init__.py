"""Model, config and data. megatron-core needs the CPU compatibility layer armed before it loads."""

from parallel import cpu_compat as _cpu_compat

_cpu_compat.apply()
