"""Command-line interfaces: thin click commands over the library."""
