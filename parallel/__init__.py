"""Parallelism: process groups, megatron-core wrapping, the CPU compatibility layer."""

from parallel import cpu_compat

cpu_compat.apply()
