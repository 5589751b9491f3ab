"""`dgemma serve`: the local HTTP server editors and agents talk to."""
