"""mxm-dataio-async: asyncio-native ingestion, caching and audit."""
