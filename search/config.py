"""Bit-width configs: a versioned JSON document assigning (w_bits, a_bits, scheme) to every layer.

    {
      "format": "bitsearch.config", "version": 1,
      "model_sha256": "<sha256 of the .pt2 file>",
      "act_calibration": "mse", "bias_correction": true,
      "layers": {"conv1": {"w_bits": 8, "a_bits": 8, "scheme": "uniform", "clip": "mse"}, ...}
    }

A config is tied to one model by its sha256 and its layer names; loading one against
another model, with an unknown or missing layer, or with bits out of range is an error
that names the problem.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .quant.activation import FLOAT_ACT_BITS

CONFIG_FORMAT = "bitsearch.config"
CONFIG_VERSION = 1


class ConfigError(ValueError):
    """A config that does not fit its model or is malformed."""


class LayerQuant(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    w_bits: int = Field(ge=1, le=8, description="weight bits, 1..8 (1 = binary)")
    a_bits: int = Field(description=f"input activation bits, 2..8, or {FLOAT_ACT_BITS} to keep it float")
    scheme: Literal["uniform", "pot", "apot"] = "uniform"
    clip: Literal["max", "mse"] = "mse"

    @field_validator("a_bits")
    @classmethod
    def _a_bits_range(cls, v: int) -> int:
        if not (2 <= v <= 8 or v == FLOAT_ACT_BITS):
            raise ValueError(f"a_bits must be in 2..8 or {FLOAT_ACT_BITS} (float), got {v}")
        return v

    @model_validator(mode="after")
    def _scheme_bits(self) -> LayerQuant:
        if self.scheme != "uniform" and self.w_bits < 2:
            raise ValueError(f"scheme {self.scheme!r} needs w_bits >= 2; 1-bit weights are binary ('uniform')")
        return self


class QuantConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["bitsearch.config"] = CONFIG_FORMAT
    version: Literal[1] = CONFIG_VERSION
    model_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    act_calibration: Literal["minmax", "percentile", "mse"] = "mse"
    bias_correction: bool = Field(
        default=True,
        description="subtract the output shift quantized weights cause "
        "(needs the calibration images' per-channel input means)",
    )
    layers: dict[str, LayerQuant]

    @classmethod
    def uniform(cls, model, w_bits: int, a_bits: int, **common) -> QuantConfig:
        return cls.from_bits(
            model, {l.name: w_bits for l in model.layers}, {l.name: a_bits for l in model.layers}, **common
        )

    @classmethod
    def from_bits(
        cls,
        model,
        w_bits: dict[str, int],
        a_bits: dict[str, int] | int = 8,
        scheme: str = "uniform",
        clip: str = "mse",
        act_calibration: str = "mse",
        bias_correction: bool = True,
    ) -> QuantConfig:
        a = a_bits if isinstance(a_bits, dict) else {l.name: a_bits for l in model.layers}
        try:
            return cls(
                model_sha256=model.sha256,
                act_calibration=act_calibration,
                bias_correction=bias_correction,
                layers={
                    l.name: LayerQuant(w_bits=w_bits[l.name], a_bits=a[l.name], scheme=scheme, clip=clip)
                    for l in model.layers
                },
            )
        except ValidationError as e:
            raise ConfigError(_describe(e)) from e

    def w_bits(self) -> dict[str, int]:
        return {k: v.w_bits for k, v in self.layers.items()}

    def a_bits(self) -> dict[str, int]:
        return {k: v.a_bits for k, v in self.layers.items()}

    def check_against(self, model) -> QuantConfig:
        if self.model_sha256 != model.sha256:
            raise ConfigError(
                f"config is for model sha256 {self.model_sha256[:12]}..., not this model ({model.sha256[:12]}...)"
            )
        names = [l.name for l in model.layers]
        unknown = [k for k in self.layers if k not in names]
        if unknown:
            raise ConfigError(f"config names unknown layer(s) {unknown}; the model's layers are {names}")
        missing = [n for n in names if n not in self.layers]
        if missing:
            raise ConfigError(f"config lacks layer(s) {missing}; every layer needs an entry")
        return self

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    @classmethod
    def from_json(cls, text: str | bytes, model=None) -> QuantConfig:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"config is not valid JSON: {e}") from e
        if not isinstance(raw, dict) or raw.get("format") != CONFIG_FORMAT:
            raise ConfigError(f'not a bitsearch config (expected "format": "{CONFIG_FORMAT}")')
        if raw.get("version") != CONFIG_VERSION:
            raise ConfigError(
                f"config version {raw.get('version')!r} is not supported (this bitsearch reads {CONFIG_VERSION})"
            )
        try:
            config = cls.model_validate(raw)
        except ValidationError as e:
            raise ConfigError(_describe(e)) from e
        return config.check_against(model) if model is not None else config


def _describe(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        where = ".".join(str(p) for p in err["loc"])
        parts.append(f"{where}: {err['msg']}" if where else err["msg"])
    return "invalid config: " + "; ".join(parts)
