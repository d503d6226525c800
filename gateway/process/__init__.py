"""Processes: the ``flashgate`` command line, serving one process with its signals,
the supervisor of ``--workers``, the demo, and what they share (exit codes,
environment names, logging, the event loop)."""
