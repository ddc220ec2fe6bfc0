"""The protocol-free core: object store, metadata index and the one ingest pipeline."""
