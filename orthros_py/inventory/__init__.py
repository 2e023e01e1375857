"""The cluster inventory (hosts, agent ports, service addresses, the client host), read from the
TOML file that ``orthros lab`` and ``vagrant/Vagrantfile`` share. No privileges needed."""

from __future__ import annotations

from orthros_py.inventory.model import (
    DEFAULT_INVENTORY,
    INVENTORY_ENV,
    ClientHost,
    Group,
    Host,
    Inventory,
    InventoryError,
    LabSettings,
    Service,
    inventory_path,
    load_inventory,
    parse_inventory,
)

__all__ = [
    "DEFAULT_INVENTORY",
    "INVENTORY_ENV",
    "ClientHost",
    "Group",
    "Host",
    "Inventory",
    "InventoryError",
    "LabSettings",
    "Service",
    "inventory_path",
    "load_inventory",
    "parse_inventory",
]
