"""The engine layer: many concurrent requests on one model, fused forwards, `mode: auto` (docs/engine.md)."""

from trimode.engine.auto import AutoConfig, CostModel
from trimode.engine.engine import Engine, validate
from trimode.engine.kv_pool import KVBudgetError
from trimode.engine.request import MODES, EngineRequest, EngineStopped, QueueFull, RequestHandle

__all__ = ["AutoConfig", "CostModel", "Engine", "EngineRequest", "EngineStopped", "KVBudgetError", "MODES",
           "QueueFull", "RequestHandle", "validate"]
