"""The test and benchmark harness: real servers (the kit, stock Gunicorn, nginx) on loopback,
and the slow-client attacks. Not shipped in the wheel or the image."""
