"""Modbus TCP PLCs through pymodbus: poll a register map, publish what changed."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from contracts import Token

Meaning = Literal["running", "available", "part_count", "bad_count", "alarm_code"]


class ModbusRegister(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    address: int = Field(ge=0, le=65535)
    table: Literal["holding", "input", "coil", "discrete"] = "holding"
    type: Literal["uint16", "int16", "uint32", "int32", "float32", "bool"] = "uint16"
    word_order: Literal["big", "little"] = "big"  # for 32-bit values: which register is high
    scale: float = 1.0
    meaning: Meaning


class ModbusConfig(BaseModel):
    """One PLC (one machine) on Modbus TCP."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    machine_id: Token
    host: str
    port: int = Field(default=502, ge=1, le=65535)
    unit: int = Field(default=1, ge=0, le=255)
    poll_s: float = Field(default=1.0, gt=0, le=3600)
    timeout_s: float = Field(default=3.0, gt=0, le=60)
    registers: list[ModbusRegister] = Field(min_length=1)
