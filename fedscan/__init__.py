"""fedscan composition root: the CLI and the demo wire concrete classes together here, and only here."""

__version__ = "0.1.0"
