"""The running state of one gateway process: the snapshot of what a reload changes
and its holder, the campaigns, the composition root that builds and stops it all,
reload, the stock watch and its sold-out flags, the sweeper, the heartbeat,
readiness, the metrics publisher and the access log."""
