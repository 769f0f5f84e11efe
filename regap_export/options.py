"""Options that METHOD.md leaves open, with their defaults, and layer-band resolution."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from .errors import RegapError

READ_POSITIONS = ("last", "post_instruction_mean")
DRIFT_COMPONENTS = ("full", "refusal")
MODES = ("regap", "fixed", "regap-seq")
# Where the correction acts (regap_export.method.modality); the first is the default.
POSITIONS = ("last+generated", "image", "all")
# What each corrected layer subtracts: the drift added since the previous corrected layer
# (default), or the layer's whole drift d_l (METHOD's first reading, which compounds).
LAYER_DRIFTS = ("increment", "total")


@dataclass(frozen=True)
class Band:
    """Half-open layer range [start, end)."""

    start: int
    end: int

    def __contains__(self, layer: int) -> bool:
        return self.start <= layer < self.end

    def layers(self) -> list[int]:
        return list(range(self.start, self.end))

    def __str__(self) -> str:
        return f"[{self.start}, {self.end})"

    @classmethod
    def parse(cls, text: str, *, option: str) -> "Band":
        try:
            start, end = (int(part) for part in text.split(":"))
        except ValueError:
            raise RegapError(f"{option} must be START:END (half-open layer range), got {text!r}") from None
        return cls(start, end)


@dataclass(frozen=True)
class RegapOptions:
    """Every choice METHOD leaves open. Bands of None resolve to METHOD's defaults."""

    read_position: str = "last"
    drift_component: str = "full"
    probe_band: Band | None = None
    adaptive_band: Band | None = None
    alpha0: float = 0.75
    alpha_max: float = 0.75
    tau: float = 0.5
    mode: str = "regap"
    positions: str = "last+generated"
    layer_drift: str = "increment"
    # Multiplies every fitted gate slope kappa_l when the correction is folded (1: as fitted).
    # The fit is a logistic regression of overlapping classes, so its slope is soft; a
    # sharper gate corrects fewer harmless requests halfway (docs/METHOD.md, "Gate sharpness").
    gate_sharpness: float = 1.0

    def __post_init__(self) -> None:
        for name, allowed in (("read_position", READ_POSITIONS), ("drift_component", DRIFT_COMPONENTS),
                              ("mode", MODES), ("positions", POSITIONS), ("layer_drift", LAYER_DRIFTS)):
            value = getattr(self, name)
            if value not in allowed:
                raise RegapError(f"unknown {name.replace('_', ' ')} {value!r}; choose one of {', '.join(allowed)}")
        from .io.checks import check_option_values

        check_option_values(self)

    def resolved(self, num_layers: int) -> "RegapOptions":
        """Options with both bands filled in and checked against the model's depth."""
        probe = self.probe_band or Band(num_layers // 4, num_layers // 2)
        adaptive = self.adaptive_band or Band(num_layers // 2, (3 * num_layers) // 4)
        for name, band in (("probe band", probe), ("adaptive band", adaptive)):
            if not (0 <= band.start < band.end <= num_layers):
                raise RegapError(
                    f"{name} {band} is outside the model's {num_layers} decoder blocks",
                    hint=f"use START:END with 0 <= START < END <= {num_layers}",
                )
        if adaptive.start < probe.end:
            raise RegapError(f"adaptive band {adaptive} must start at or after the probe band {probe} ends")
        return dataclasses.replace(self, probe_band=probe, adaptive_band=adaptive)

    @property
    def read_layer(self) -> int:
        """l_s: the last probe layer, where regap-seq reads its per-sequence score."""
        if self.probe_band is None:
            raise RuntimeError("options not resolved")
        return self.probe_band.end - 1

    def to_json(self) -> str:
        data: dict[str, Any] = dataclasses.asdict(self)
        for key in ("probe_band", "adaptive_band"):
            band = getattr(self, key)
            data[key] = None if band is None else [band.start, band.end]
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "RegapOptions":
        """Options from ``to_json``'s text: strict JSON (no NaN/Infinity), an object, bands as
        [start, end] integer pairs; values checked as the constructor checks them."""
        from .io.checks import strict_json_loads

        data = strict_json_loads(text, what="the options", error=RegapError)
        if not isinstance(data, dict):
            raise RegapError("the options are not a JSON object")
        for key in ("probe_band", "adaptive_band"):
            band = data.get(key)
            if band is not None:
                if (not isinstance(band, list) or len(band) != 2
                        or not all(isinstance(v, int) and not isinstance(v, bool) for v in band)):
                    raise RegapError(f"{key} must be [start, end] (integers), got {band!r}", field=key)
                data[key] = Band(*band)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
