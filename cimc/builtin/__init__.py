"""cimc subpackage."""
