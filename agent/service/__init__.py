"""The service: settings (one table), wiring, shutdown, systemd notify, Prometheus."""
