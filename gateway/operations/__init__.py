"""For operators: the admin API (stock, reservations, reload, metrics) and the
commands that read Redis directly (status, reconcile), with their terminal output."""
