"""Secure aggregation (Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine
Learning", CCS 2017): the coordinator learns the sum of the sites' integer vectors and nothing else
about any one of them, even when sites drop out after they masked (up to the threshold).

Pure functions over bytes and integer arrays, no I/O and no Flower; the coordinator's and the site's
stages call them. A round has four message stages:

1. **keys** (:func:`protocol.advertise`): each site draws two X25519 key pairs for this round, ``c`` for
   the channel between sites through the coordinator and ``s`` for the masks, and sends the public keys;
   the coordinator sends every site the roster of all of them (site number → public keys).
2. **shares** (:func:`protocol.share`): each site draws its self-mask seed ``b_u`` and sends, for every
   other site ``v``, a Shamir share of ``b_u`` and of its mask secret key ``s_u``, encrypted with
   ChaCha20-Poly1305 under a key only ``u`` and ``v`` can derive (X25519 + HKDF-SHA256). The coordinator
   routes the ciphertexts and cannot read them.
3. **masked input** (:func:`protocol.mask`): each site that got its shares out sends
   ``y_u = x_u + PRG(b_u) + Σ_{v>u} PRG(s_uv) − Σ_{v<u} PRG(s_uv)`` in the ring ℤ/2^k, where ``s_uv`` is
   the X25519 secret of ``u`` and ``v`` through HKDF-SHA256 and PRG is ChaCha20 keyed with the full
   256-bit seed (:mod:`.masks`). The pair masks cancel in the sum.
4. **unmasking** (:func:`protocol.reveal`): the coordinator names the sites whose masked input arrived;
   each survivor reveals its shares of ``b_v`` for every survivor ``v`` and of ``s_v`` for every site
   that dropped after stage 2, never both for one site. From ``t`` shares each, the coordinator removes
   the self masks of the survivors and the pair masks the dropped sites left (:func:`protocol.unmask`).

Vectors enter as fixed-point integers (:mod:`.fixed_point`): clipped to a public range, rounded, in a
ring wide enough for the cohort. Shamir sharing is over the prime field 2^521 − 1 (:mod:`.shamir`).
Every primitive is from ``cryptography``; the masks are keyed with the whole 256-bit secret (Flower
1.39's SecAgg+ folds its key into a 32-bit ``RandomState`` seed, flwr#7522: a curious coordinator can
try all 2^32 and strip a site's masks).
"""
