"""The MQTT front door: connection, TLS, topics, PROTOCOL.md parts A, B and C, acks, status."""
