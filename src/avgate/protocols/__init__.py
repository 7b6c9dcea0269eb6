"""Sans-IO protocol codecs (bytes ⇄ events). No module here imports asyncio or does I/O."""
