"""Stage ``process``: one series through the pipeline (volume → optional denoise → engine → derived objects)
and the engine boundary (engine cache, cubic fallback). Used by the job runner and by ``srnode process``.

To add an engine: a module in ``models/`` registered by name in ``models.engine``; nothing here changes.
"""

from node.process.budget import BudgetError, check_series, series_budget_mb
from node.process.engines import FALLBACK_ENGINE, EngineCache, run_engine
from node.process.pipeline import ProcessResult, process_series, write_atomic
from node.process.space import ResultsRoom, ResultsSpaceError, describe_write_error, write_error

__all__ = ["FALLBACK_ENGINE", "BudgetError", "EngineCache", "ProcessResult", "ResultsRoom", "ResultsSpaceError",
           "check_series", "describe_write_error", "process_series", "run_engine", "series_budget_mb",
           "write_atomic", "write_error"]
