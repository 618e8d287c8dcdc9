"""What the tests, the benchmarks and the experiment share: real servers (the kit, stock
Gunicorn, nginx) on loopback, the clients that load them (closed loop, open loop on hey, the
slow-client attacks) and the CPU counters that measure them. Not shipped in the wheel or the
image; ``bench/`` and ``loadtest/`` import it, never each other."""
