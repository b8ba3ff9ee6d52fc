"""Privacy: DP-SGD wiring (Opacus), accountants, the per-client privacy ledger and audits.

Empty until the privacy work lands; nothing here is imported by the non-private path.
"""
