"""The wire: bytes <-> messages (``codec``), freshness (``replay``) and the keys (``keyring``).

Everything here is pure: no sockets, clocks or files. Reading key files is ``pyquorum.keyfile``'s job.
"""
