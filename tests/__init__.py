"""ftforget's test suite (a package, so that helpers import as ``tests.<module>`` with no sys.path edits)."""
