"""fastpeft: fast PEFT-compatible adapters."""
