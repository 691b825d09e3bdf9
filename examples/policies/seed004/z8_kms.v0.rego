package z8.kms
default allow = false
allow {
  input.key_purpose == "model-sign"
  input.claims.role == "ml-sec"
  input.env == "prod"
  time.now_ns() - input.claims.session_start < 3600000000000  # 1h
}
