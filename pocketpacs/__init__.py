"""pocketpacs: the command line and the assembly of its three parts (pacs, storage, viewer_api)."""
