"""The fleet control plane: an ASGI app over a SQL database (SQLite or PostgreSQL). It never runs a model and
never imports the engine, so it installs without llama.cpp."""
