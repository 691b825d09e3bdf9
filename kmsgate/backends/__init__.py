"""Key backends: softkms (embedded), and later hashivault, awskms, pkcs11."""
