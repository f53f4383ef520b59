
target "build" {
  args = {
    HELLO = "foo"
  }
}
