"""Redis servers started on this machine: one embedded redis-server, and the Sentinel
and Cluster topologies of the demo, the bench and the tests. Imports nothing of
flashgate's."""
