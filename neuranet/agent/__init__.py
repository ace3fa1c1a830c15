"""The device agent: one outbound connection to the coordinator, profile, telemetry, links."""
