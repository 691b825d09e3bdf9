"""SoftHSM2 token fixtures for the pkcs11 backend (to be written with issue 3)."""
