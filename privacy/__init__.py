"""Privacy: DP-SGD wiring (Opacus), accountants, a site's persisted account, the signed privacy ledger,
central DP around Flower's wrapper, and the audit.

Nothing here is imported by the non-private path except the client's pass-through clipping mod.
"""
