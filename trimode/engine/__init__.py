"""The engine layer: many concurrent requests on one model, one step loop, fused forwards, `mode: auto`
(docs/engine.md)."""

from trimode.decode.modes import names as _mode_names
from trimode.engine.auto import AutoConfig, CostModel
from trimode.engine.engine import Engine
from trimode.engine.kv_pool import KVBudgetError
from trimode.engine.request import EngineRequest, EngineStopped, QueueFull, RequestCancelled, RequestHandle

MODES = _mode_names()  # every mode of the registry runs in the engine

__all__ = ["AutoConfig", "CostModel", "Engine", "EngineRequest", "EngineStopped", "KVBudgetError", "MODES",
           "QueueFull", "RequestCancelled", "RequestHandle"]
