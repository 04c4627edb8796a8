"""Wire types of the HTTP APIs, one module per protocol (``ollama``, ``openai``), shared by server and client."""
