"""vps-agent: keeps a Debian/Ubuntu VPS at its hardened baseline and heals drift within milliseconds."""

__version__ = "0.2.0"
