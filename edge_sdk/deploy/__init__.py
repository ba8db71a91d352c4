"""Deployment from the workstation to devices: ``edge-sdk deploy PKG --to TARGET``.

A target is a local directory or ``ssh://user@host[:port]/path``. On each target, the package's
files are uploaded content-addressed (only what the device lacks, resuming partial uploads),
verified there, preflighted by the device's own ``edge-sdk`` (fingerprint, backend, parity,
engine build if allowed), installed under ``versions/<package-hash>/``, switched in through an
atomic ``current`` link, and the daemon is reloaded and waited for; any failure rolls back.
"""
