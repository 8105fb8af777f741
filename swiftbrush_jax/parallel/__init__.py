"""Parallelism: the device mesh and its sharding rules, multi-host start-up and the peer watchdog."""
