"""odmr-bridge: On-Demand Mail Relay (RFC 2645) beside an existing MTA."""

__version__ = "0.1.0"
