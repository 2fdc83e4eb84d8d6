"""The asyncio shell around the core: the only place with sockets, clocks, files and signals."""
