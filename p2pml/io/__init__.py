"""Network I/O: the HTTP data plane (and, later, the DHT overlay). Third-party I/O enters here."""
