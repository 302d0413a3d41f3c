"""Parallelism: process groups, megatron-core wrapping, checkpoints, the CPU compatibility layer."""

from parallel import cpu_compat as _cpu_compat

_cpu_compat.apply()
