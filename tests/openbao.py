"""OpenBao dev-server fixtures for the hashivault backend (to be written with issue 4)."""
