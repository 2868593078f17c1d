"""Test support: emulated cloud sandbox hosts and control planes (no real cloud needed)."""
