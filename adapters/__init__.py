"""Adapters: machines and ERP systems in, contract events out (through a publisher port)."""
