"""Machine adapters, one module per protocol."""
