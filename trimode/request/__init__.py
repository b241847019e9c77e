"""The request core, shared by the API facade (`TriMode`) and the engine (`trimode.engine`): a validated request
(`Prepared`) and its preparation (`prepared`), the edit builders (`edits`) and the block plan they make
(`edit_plan`), and the output objects that turn machine events into what the caller sees (`output`)."""

from trimode.request.edit_plan import EditPlan
from trimode.request.edits import HOLE, fill_request, infill_request, revise_request
from trimode.request.output import EditOutput, TextOutput
from trimode.request.prepared import Prepared, model_defaults, prepare, prepare_edit

__all__ = ["HOLE", "EditOutput", "EditPlan", "Prepared", "TextOutput", "fill_request", "infill_request",
           "model_defaults", "prepare", "prepare_edit", "revise_request"]
