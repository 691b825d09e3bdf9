"""moto_server fixtures for the awskms backend (to be written with issue 5)."""
