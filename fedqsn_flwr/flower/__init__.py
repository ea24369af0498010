"""The Flower integration.

Strategies, the wire format, the protocol's names, client helpers, reply
checks and privacy bookkeeping.
"""
