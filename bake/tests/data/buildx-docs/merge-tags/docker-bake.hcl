target "webapp" {
  tags = ["foo"]
}
