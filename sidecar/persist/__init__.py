"""The cache snapshot: its file format (``snapshot.py``) and the file store (``store.py``)."""
