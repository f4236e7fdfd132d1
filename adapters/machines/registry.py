"""Which adapter class serves which protocol, and building them from the ``[adapters]`` table."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from adapters.machines.base import MachineAdapter, url_host
from adapters.machines.config import AdaptersConfig
from adapters.machines.focas import FocasAdapter
from adapters.machines.haas import HaasAdapter
from adapters.machines.lsv2 import Lsv2Adapter
from adapters.machines.modbus import ModbusAdapter
from adapters.machines.mtconnect import MtconnectAdapter
from adapters.machines.opcua import OpcuaAdapter
from adapters.machines.serial_line import SerialLineAdapter
from adapters.machines.shdr import ShdrAdapter
from adapters.machines.sparkplug import SparkplugAdapter

PROTOCOLS: dict[str, Callable[[Any], MachineAdapter]] = {
    "mtconnect": MtconnectAdapter,
    "shdr": ShdrAdapter,
    "opcua": OpcuaAdapter,
    "modbus": ModbusAdapter,
    "serial": SerialLineAdapter,
    "focas": FocasAdapter,
    "sparkplug": SparkplugAdapter,
    "lsv2": Lsv2Adapter,
    "haas": HaasAdapter,
}


def build_adapters(config: AdaptersConfig, protocol: str | None = None) -> list[MachineAdapter]:
    """One adapter per configured entry (of ``protocol``, or of every protocol)."""
    names = PROTOCOLS if protocol is None else {protocol: PROTOCOLS[protocol]}
    return [make(entry) for name, make in names.items() for entry in getattr(config, name)]


def describe(adapter: MachineAdapter) -> str:
    """One line for the console: protocol and peer (a URL, an endpoint such as a serial
    device, or host and port, an IPv6 address in brackets)."""
    config = getattr(adapter, "config", None)
    peer = (
        getattr(config, "url", None)
        or getattr(config, "endpoint", None)
        or f"{url_host(str(getattr(config, 'host', '?')))}:{getattr(config, 'port', '?')}"
    )
    return f"{adapter.protocol} {peer}"
