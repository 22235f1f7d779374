"""Model files, their derivation and the streaming engines that run them (no torch).

This package must not import the gateway, worker, transport or CLI: processors
build on it, not the other way round.
"""
