"""Stage ``process``: one series through the pipeline (volume → optional denoise → engine → derived objects)
and the engine boundary (engine cache, cubic fallback). Used by the job runner and by ``srnode process``.

To add an engine: a module in ``models/`` registered by name in ``models.engine``; nothing here changes.
"""

from node.process.engines import FALLBACK_ENGINE, EngineCache, run_engine
from node.process.pipeline import ProcessResult, process_series, write_atomic

__all__ = ["FALLBACK_ENGINE", "EngineCache", "ProcessResult", "process_series", "run_engine", "write_atomic"]
