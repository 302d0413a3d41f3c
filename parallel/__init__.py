"""Parallelism: process groups, megatron-core wrapping, checkpoints, the CPU compatibility layer."""

import logging as _logging

from parallel import cpu_compat as _cpu_compat

_cpu_compat.apply()
# megatron-bridge logs each optional import it could not make at INFO, with a whole traceback: Transformer
# Engine's FP8GlobalStateManager at every start of a model=hf run wherever TE is not installed (CPU, or a GPU
# without the extra). Expected there, so not shown. A filter, not a level: the module sets its logger's level
# when it is imported, later than this.
_logging.getLogger("megatron.bridge.utils.import_utils").addFilter(lambda record: record.levelno >= _logging.WARNING)
