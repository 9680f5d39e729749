"""What the ``heads`` section validates into: one :class:`TrainItem` per ``heads.<name>``, each
with the :class:`HeadConfig` of its heads (what the training loop and the model file read)."""

import dataclasses
from typing import Any

from pydantic import BaseModel, ConfigDict

from angular.nn.heads import MarginSpec


class HeadConfig(BaseModel):
    """One margin head: its preset ``type`` and the resolved margin ``(s, m1, m2, m3, lam)``."""

    model_config = ConfigDict(frozen=True)

    name: str
    type: str
    margin: MarginSpec
    straight_through: bool
    fused_linear: bool | None = None  # None: MarginHead decides by the class count
    options: dict[str, Any] = {}  # an adaptive head's other arguments (angular.nn.adaptive)

    def to_dict(self) -> dict[str, Any]:
        m, lam = self.margin, self.margin.lam_schedule
        schedule = None if lam is None else dataclasses.asdict(lam)
        margin = {"s": m.s, "m1": m.m1, "m2": m.m2, "m3": m.m3, "lam_schedule": schedule}
        return {
            "type": self.type,
            **margin,
            "straight_through": self.straight_through,
            "fused_linear": self.fused_linear,
            **({"options": dict(self.options)} if self.options else {}),
        }


class TrainItem(BaseModel):
    """What one ``train@<name>`` stage trains: one backbone with one head, or (``joint``) several
    heads on one shared backbone with their losses summed. ``heads`` maps each ensemble member's
    name to its head: the item's own name for a single head, ``<item>_<head>`` in a joint group."""

    model_config = ConfigDict(frozen=True)

    name: str
    joint: bool
    heads: dict[str, HeadConfig]
