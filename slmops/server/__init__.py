"""HTTP server: routes → handlers → engine client."""
