"""The sans-I/O election core. Never imports asyncio, socket, time, os, signal, subprocess or threading."""
