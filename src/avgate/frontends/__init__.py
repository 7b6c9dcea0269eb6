"""Front-ends: thin asyncio adapters between sockets (or pipes) and the Gateway."""
