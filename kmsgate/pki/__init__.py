"""The PKI: CA keys held by any backend (`remote_key`), certificate profiles, issuance, CRLs
and OCSP. The use cases that drive it live in `kmsgate/service/pki.py`."""
