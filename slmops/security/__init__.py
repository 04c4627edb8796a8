"""Keys and roles, rate limits, the audit log; later model signing and encryption at rest. No HTTP here: the
server's access middleware and the CLI use these."""
